"""`raypp plan --emit`: the file is a Ray Serve config whose app args validate as a DeploymentConfig."""
import yaml

from raypp.cli import main
from raypp.config import DeploymentConfig


def _load(path):
    doc = yaml.safe_load(path.read_text())
    (app,) = doc["applications"]
    assert app["import_path"] == "raypp.serve:build_app" and app["route_prefix"] == "/"
    assert "deployments" not in app and "ray_actor_options" not in str(doc)   # workers use placement groups
    return app, DeploymentConfig.from_yaml_args(app["args"])


def test_emit_70b_on_two_nodes(tmp_path, capsys):
    out = tmp_path / "deployments" / "my.yaml"
    assert main(["plan", "--model", "llama-3-70b", "--gpu", "h100-sxm", "--gpus-per-node", "8", "--nodes", "2",
                 "--dtype", "bf16", "--priority", "latency", "--concurrency", "64", "--tp", "8", "--pp", "2",
                 "--emit", str(out)]) == 0
    capsys.readouterr()
    text = out.read_text()
    assert "point it at your llama-3-70b checkpoint" in text      # placeholder path is explained
    _, cfg = _load(out)
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.device) == (8, 2, "cuda")
    assert sum(cfg.parallel.stage_layers) == 80 and len(cfg.parallel.stage_layers) == 2
    assert cfg.model.path == "/models/llama-3-70b" and cfg.model.dtype == "bfloat16"
    assert cfg.micro_batches == 2 and cfg.scheduler.max_num_seqs == 64
    assert cfg.model.max_model_len == 1200


def test_emit_cpu_small_with_model_path(tmp_path, capsys):
    out = tmp_path / "cpu.yaml"
    assert main(["plan", "--model", "small", "--gpu", "cpu", "--gpus-per-node", "2", "--dtype", "fp32",
                 "--concurrency", "4", "--input-len", "64", "--output-len", "64", "--tp", "1", "--pp", "2",
                 "--model-path", "checkpoints/mine", "--emit", str(out)]) == 0
    capsys.readouterr()
    _, cfg = _load(out)
    assert cfg.parallel.device == "cpu" and cfg.model.dtype == "float32"
    assert cfg.model.path == "checkpoints/mine" and cfg.model.make_tiny_if_missing is None
    assert cfg.parallel.stage_layers is not None and sum(cfg.parallel.stage_layers) == 8
    assert cfg.parallel.cpus_per_worker <= 1.0


def test_emit_own_preset_is_made_if_missing(tmp_path, capsys):
    out = tmp_path / "tiny.yaml"
    assert main(["plan", "--model", "tiny", "--gpu", "cpu", "--gpus-per-node", "2", "--dtype", "fp32",
                 "--concurrency", "2", "--input-len", "32", "--output-len", "32", "--emit", str(out)]) == 0
    capsys.readouterr()
    _, cfg = _load(out)
    assert cfg.model.make_tiny_if_missing == "tiny" and cfg.model.path == "checkpoints/tiny"
