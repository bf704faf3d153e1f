"""The shipped form of a pretrained InstantID adapter: SOURCE (what `limner pretrain --method instantid` wrote, its
IdentityNet a full ControlNet) copied to OUT with the IdentityNet stored as a delta against the base's UNet, each
copied matrix's change truncated to the rank keeping --energy of it (limner.methods.instantid.weights.compact_adapter;
adapter.json records rank, energy, the ranks taken and the sha256 of the full weights). The world adapter is shipped
at energy 0.98 (docs/world-bench-identities/instantid.md: 16.2 -> 10.4 MB, residuals within 0.7%).

    python scripts/compact_instantid.py SOURCE OUT [--energy 0.98 | --rank R] [--base DIR]
"""

import argparse

from limner.methods.instantid.weights import compact_adapter
from limner.models.loading import load_base

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("source", help="the adapter folder limner pretrain wrote")
parser.add_argument("out", help="the folder for the compact adapter (may be SOURCE itself)")
parser.add_argument("--energy", type=float, default=None, help="share of each change's squared norm kept (0.98)")
parser.add_argument("--rank", type=int, default=None, help="a fixed rank per matrix instead (or a cap with --energy)")
parser.add_argument("--base", default=None, help="the base the adapter was pretrained on (default: the world)")
args = parser.parse_args()
energy = 0.98 if args.energy is None and args.rank is None else args.energy
out = compact_adapter(load_base(args.base, device="cpu"), args.source, args.out, rank=args.rank, energy=energy)
print(f"compact adapter written to {out}")
