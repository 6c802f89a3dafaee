"""One import namespace that no dependency can shadow (issue 24).

transformers >= 5.25 imports Hugging Face's `kernels` package; the project's own folder kernels/ once shadowed it
from the repository root (the current directory comes first on sys.path), and every transformers model build died.
The project is imported as `r1_engine.*`; its top-level folders carry no __init__.py, so a regular package of the
same name anywhere later on sys.path wins over them."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_FOLDERS = ("engine", "kernels", "parallel", "recipes", "native")

PROBE = textwrap.dedent("""
    import importlib, json, pkgutil, sys
    from pathlib import Path
    import kernels                                    # Hugging Face's, as transformers needs it
    hf_kernels = kernels.__file__
    from kernels import CUDAProperties                 # noqa: F401 - what transformers' hub_kernels imports
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, Qwen2Config, Qwen2ForCausalLM
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    ds = DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, n_shared_experts=1))
    ids = torch.tensor([[1, 2, 3]])
    assert qwen(ids).logits.shape == (1, 3, 64) and ds(ids).logits.shape == (1, 3, 64)
    imported = []
    import r1_engine
    for top in %(folders)r:
        package = importlib.import_module(f"r1_engine.{top}")
        imported.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"r1_engine.{top}."):
            importlib.import_module(info.name)
            imported.append(info.name)
    print(json.dumps({"hf_kernels": hf_kernels, "imported": imported, "path0": sys.path[0],
                      "r1_engine": list(r1_engine.__path__)}))
""") % {"folders": TOP_FOLDERS}


def test_top_level_folders_are_not_regular_packages():
    """A folder with __init__.py at the repository root would win over any installed package of its name."""
    for name in TOP_FOLDERS:
        assert not (ROOT / name / "__init__.py").exists(), f"{name}/__init__.py makes `import {name}` ours"


def test_hf_kernels_transformers_models_and_every_module_from_the_repository_root():
    """In one interpreter started from the repository root (`python -c`, the current directory first on
    sys.path): HF's `kernels` is what `import kernels` finds, transformers builds a Qwen2 and a DeepSeek-V3, and every
    module of the project imports under r1_engine.*."""
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["path0"] == "", "python -c puts the current directory first; the probe must see that case"
    assert "site-packages" in result["hf_kernels"] and not result["hf_kernels"].startswith(str(ROOT / "kernels"))
    modules = set(result["imported"])
    on_disk = {f"r1_engine.{p.relative_to(ROOT).with_suffix('').as_posix().replace('/', '.')}"
               for top in TOP_FOLDERS for p in (ROOT / top).rglob("*.py")
               if "__pycache__" not in p.parts and p.name != "__init__.py"}
    missing = sorted(on_disk - modules)
    assert not missing, f"modules not imported: {missing}"
    assert {"r1_engine.kernels.linear_grpo", "r1_engine.parallel.step", "r1_engine.recipes.r1"} <= modules


def test_no_script_edits_sys_path():
    """The recipes and benchmarks run through the installed package (console commands, `python -m`, or the script
    path), never by putting the repository's folders ahead of site-packages."""
    offenders = []
    for top in (*TOP_FOLDERS, "benchmarks"):
        for path in (ROOT / top).rglob("*.py"):
            if "sys.path.insert" in path.read_text(encoding="utf-8"):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
    assert 'pythonpath = ["."]' not in (ROOT / "pyproject.toml").read_text()


def _import_graph():
    """module -> the project modules it imports, at module level or inside functions (both count: a lazy import is
    still a dependency), from the source with ast."""
    import ast

    graph, private = {}, []
    for top in ("engine", "kernels", "parallel", "recipes"):
        for path in (ROOT / top).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = "r1_engine." + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            package = name if parts[-1] == "__init__" else name.rsplit(".", 1)[0]
            deps = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom):
                    if node.level:  # relative: resolve against the package
                        base = package.split(".")[: len(package.split(".")) - node.level + 1]
                        module = ".".join(base + ([node.module] if node.module else []))
                    else:
                        module = node.module or ""
                    if not module.startswith("r1_engine."):
                        if module.split(".")[0] == "megatron":
                            deps.add(module)
                        continue
                    for alias in node.names:
                        sub = f"{module}.{alias.name}"
                        target = sub if (ROOT / Path(*sub.split(".")[1:])).with_suffix(".py").is_file() else module
                        deps.add(target)
                        if alias.name.startswith("_") and target == module and module != name:
                            private.append(f"{name} imports {module}.{alias.name}")
                elif isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names if a.name.startswith(("r1_engine.", "megatron"))}
            graph[name] = deps - {name}
    return graph, private


def test_layers_look_one_way_without_circles():
    """recipes -> engine -> parallel -> kernels, never back up; engine reaches Megatron only through parallel/; no
    import circle inside engine/ or parallel/ (lazy imports included); no private name imported across modules."""
    graph, private = _import_graph()
    rank = {"recipes": 3, "engine": 2, "parallel": 1, "kernels": 0}
    for module, deps in graph.items():
        layer = module.split(".")[1]
        for dep in deps:
            if dep.startswith("megatron"):
                assert layer == "parallel", f"{module} imports {dep}: Megatron is reached through parallel/ only"
                continue
            assert rank[dep.split(".")[1]] <= rank[layer], f"{module} imports {dep}: the layers look one way"
    assert not private, private
    project = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    cycles = []
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(project[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(project):
        if module not in state and module.split(".")[1] in ("engine", "parallel"):
            visit(module, [])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles[:5])
