"""Personalization methods: one module per method, each named and written as in its paper.

- `base`: the contract (`Method`, `Capabilities`, `Installation`, `Conditioning`);
- `tuning`: the template every training method fills in (`TuningMethod`);
- `adapter`: the encoder and identity families' template: pretrain an adapter once, encode (`AdapterMethod`);
- `settings`: settings dataclasses with help text, and `--set` parsing;
- `registry`: `@register` and `get_method`; a new method registers itself and changes nothing else.
"""

from limner.methods.base import FAMILIES, Capabilities, Conditioning, Installation, Method, WindowHook, install_key
from limner.methods.registry import REGISTRY, get_method, method_names, register
from limner.methods.settings import added_setting, parse_setting, setting, split_settings, with_settings
from limner.subject import Subject

__all__ = [
    "FAMILIES",
    "REGISTRY",
    "Capabilities",
    "Conditioning",
    "Installation",
    "Method",
    "Subject",
    "WindowHook",
    "added_setting",
    "get_method",
    "install_key",
    "method_names",
    "parse_setting",
    "split_settings",
    "register",
    "setting",
    "with_settings",
]
