"""Custom Diffusion (Kumari et al., 2023): "Multi-Concept Customization of Text-to-Image Diffusion".

Fine-tuning shows that the cross-attention key and value projections (W_k, W_v of every attn2,
about 5% of the UNet) change most; Custom Diffusion updates only those, plus a modifier token V*
placed before the class noun ("a V* dog"), initialised from a rare token. Regularisation images are
real images whose captions are close to the class prompt (retrieved by CLIP similarity), trained with
their own captions. Augmentation rescales the subject: shrunk images get "far away" / "very small"
prompts, enlarged ones "zoomed in" / "close up", and the loss is masked to the valid region.

Several concepts combine by joint training, or by a closed-form merge of separately tuned models:
for each W in {W_k, W_v}, find W closest to the base W0 on the regularisation captions' features
C_reg while reproducing each tuned model's outputs V on its own concept's features C:
    W = W0 + v d^T,  d^T = C (C_reg^T C_reg)^-1,  v = (V - W0 C^T) (d^T C^T)^-1.
"""

from limner.methods.custom_diffusion.config import CustomDiffusionConfig, default_train_config
from limner.methods.custom_diffusion.formats import (
    MODES,
    WEIGHTS_FILE,
    cross_attention_layers,
    install_weights,
    layer_weights,
    read_weights,
    save_concept,
    trained_projections,
)
from limner.methods.custom_diffusion.merge import (
    closed_form,
    closed_form_solver,
    compose,
    concept_features,
    generic_captions,
    load_tokens,
    merge,
    merge_captions,
    merged_weights,
    prompt_features,
    read_concepts,
)
from limner.methods.custom_diffusion.method import CustomDiffusion
from limner.methods.custom_diffusion.retrieval import (
    Pool,
    folder_pool,
    pool_index,
    regularization_set,
    retrieve,
    world_pool,
)
from limner.methods.custom_diffusion.task import CustomDiffusionTask, instance_prompt, rescale

__all__ = [
    "MODES",
    "WEIGHTS_FILE",
    "CustomDiffusion",
    "CustomDiffusionConfig",
    "CustomDiffusionTask",
    "Pool",
    "closed_form",
    "closed_form_solver",
    "compose",
    "concept_features",
    "cross_attention_layers",
    "default_train_config",
    "folder_pool",
    "generic_captions",
    "install_weights",
    "instance_prompt",
    "layer_weights",
    "load_tokens",
    "merge",
    "merge_captions",
    "merged_weights",
    "pool_index",
    "prompt_features",
    "read_concepts",
    "read_weights",
    "regularization_set",
    "rescale",
    "retrieve",
    "save_concept",
    "trained_projections",
    "world_pool",
]
