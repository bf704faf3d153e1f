"""limner: subject-driven personalization of diffusion models.

Layers, bottom to top. A module imports from its own layer and the layers below it, never from a
layer above; tests/test_layers.py reads this list (`N. name: modules`, `pkg.*` for a package and
everything in it, the most specific name winning) and checks every import against it, lazy ones too.

1. core: limner, limner.errors, limner.io, limner.images, limner.values, limner.progress
2. world data: limner.world, limner.world.vocab, limner.world.render, limner.world.scenes, limner.world.heldout,
   limner.world.bench
3. models and encoders: limner.models.*, limner.world.stack, limner.encoders.*, limner.world.probes, limner.data.*
4. machinery: limner.regions, limner.generation, limner.training.*, limner.adapters.*, limner.world.pose
5. concepts and methods: limner.subject, limner.concepts, limner.methods.*
6. conditioning: limner.conditioning
7. tools: limner.evaluation.*, limner.demo, limner.world.check, limner.world.build, limner.world.stages,
   limner.world.faces, limner.commands.*, limner.app.*, limner.cli

`world/` spans layers: its data (2) sit below everything, its probes (3) are instruments the
encoders use, and its build (with its training stages) and check (7) are tools that train and draw
with the layers between.
`limner.images` (uint8 pictures to model inputs) is core because encoders, probes, the trainer's
data and the world build all use it. `limner.data` (the encoder methods' pretraining streams) sits beside
the encoders: it draws from the world's data and reads files; the trainer saves a stream's position through
a protocol of its own, without importing it. `limner.commands` holds one module per command (its shared
options in `commands.options`); `limner.cli` assembles them.
"""
