"""`--set module.name=value` for the benchmarks: try a torch.compile setting without changing the trainer.

    --set functorch.functionalize_rng_ops=True --set functorch.activation_memory_budget=0.5

`module` is one of torch's compile stacks (dynamo, functorch, inductor); the value is a Python literal.
"""

import ast
import importlib

MODULES = {
    "dynamo": "torch._dynamo.config",
    "functorch": "torch._functorch.config",
    "inductor": "torch._inductor.config",
}


def apply(settings: list[str]) -> None:
    for setting in settings:
        key, _, value = setting.partition("=")
        module_name, _, name = key.partition(".")
        if module_name not in MODULES or not name or not value:
            raise SystemExit(f"--set {setting}: expected one of {', '.join(MODULES)}, then .name=value")
        config = importlib.import_module(MODULES[module_name])
        if not hasattr(config, name):
            raise SystemExit(f"--set {setting}: {MODULES[module_name]} has no setting {name}")
        setattr(config, name, ast.literal_eval(value))
        print(f"torch setting: {MODULES[module_name]}.{name} = {getattr(config, name)!r}", flush=True)
