"""The Helm chart, rendered by real Helm (its Go SDK through helm-python-sdk, offline) and every
manifest validated against the Kubernetes schemas (kubernetes-validate, strict) or, for the CRDs,
the models generated from their CRD schemas (cloudcoil-models-*). See docs/deploy.md."""

from __future__ import annotations

import copy
import os
import runpy
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# deploy/ holds scripts, not a package: helmtool.py's names as attributes.
helmtool = SimpleNamespace(**runpy.run_path(str(ROOT / "deploy" / "helmtool.py")))
helm = pytest.importorskip("helm_python", reason="dev extra: helm-python-sdk")

CHART = ROOT / "deploy" / "helm" / "lrsa-serve"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def render(values: dict | None = None, **kw) -> list[dict]:
    return helmtool.documents(helmtool.render(values, **kw))


def example(name: str) -> dict:
    return yaml.safe_load((CHART / "examples" / f"{name}.yaml").read_text())


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


def pod_specs(docs: list[dict]) -> list[dict]:
    specs = []
    for doc in docs:
        if doc["kind"] == "Pod":
            specs.append(doc["spec"])
        elif doc["kind"] in ("Deployment", "Job"):
            specs.append(doc["spec"]["template"]["spec"])
    return specs


def server(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# ---- every shipped configuration renders and is valid Kubernetes ----


def test_examples_exist():
    names = {p.stem for p in EXAMPLES}
    assert {"cpu", "gpu", "gpu-tensor-parallel", "autoscaling-keda", "training-pipeline"} <= names


@pytest.mark.parametrize("values_file", [None, *EXAMPLES], ids=lambda p: p.stem if p else "default")
def test_renders_valid_manifests(values_file):
    values = helmtool.load_values([values_file] if values_file else [])
    docs = render(values)
    assert {"Deployment", "Service", "ConfigMap"} <= {d["kind"] for d in docs}
    helmtool.validate_all(docs)  # every object, oldest supported and newest Kubernetes


def test_lint_is_clean():
    for values_file in [None, *EXAMPLES]:
        values = helmtool.load_values([values_file] if values_file else [])
        report = helm.lint(str(CHART), values, strict=True, kube_version="v1.33.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        # Chart.yaml carries no icon: lint's only remark, at severity info.
        assert not problems and not report["errors"], (values_file, report)


def test_validator_is_not_vacuous():
    """A typo'd field or a wrong type is caught, in built-in kinds and in both CRDs."""
    docs = render({"metrics": {"serviceMonitor": {"enabled": True}},
                   "autoscaling": {"keda": {"enabled": True}}})  # fmt: skip
    for kind, mutate in (
        ("Deployment", lambda d: d["spec"]["template"]["spec"].update(nodeSelectr={})),
        ("Deployment", lambda d: d["spec"].update(replicas="one")),
        ("Service", lambda d: d["spec"]["ports"][0].update(port="http")),
        ("ServiceMonitor", lambda d: d["spec"].update(endpoint=[])),
        ("ScaledObject", lambda d: d["spec"].update(minReplicas=1)),
    ):
        bad = copy.deepcopy(one(docs, kind))
        mutate(bad)
        with pytest.raises(helmtool.ManifestError):
            helmtool.validate(bad, "1.33")


# ---- what the defaults promise ----


def test_image_is_pinned_to_app_version():
    docs = render()
    images = {c["image"] for spec in pod_specs(docs) for c in spec["containers"]}
    assert images == {f"lrsa-serve:{APP_VERSION}"}
    cpu = render({"gpu": {"enabled": False}, "lagkv": {"lag": 256, "sink": 32}})
    assert server(cpu)["image"] == f"lrsa-serve:{APP_VERSION}-cpu"


def test_pods_are_locked_down():
    values = helmtool.load_values([CHART / "examples" / "training-pipeline.yaml"])
    docs = render(values)
    specs = pod_specs(docs)
    assert len(specs) == 3  # server, training Job, helm test
    for spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        assert spec["automountServiceAccountToken"] is False
        assert spec["enableServiceLinks"] is False
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "memory" in c["resources"]["limits"], c["name"]
    # A read-only root needs somewhere to write: /tmp, the caches in $HOME, /dev/shm.
    for spec in (server(docs), one(docs, "Job")["spec"]["template"]["spec"]["containers"][0]):
        mounts = {m["mountPath"] for m in spec["volumeMounts"]}
        assert {"/tmp", "/home/lrsa", "/dev/shm"} <= mounts


def test_probes_and_ports():
    c = server(render())
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    # Startup covers a long model load before liveness may restart the pod.
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert env_of(c)["LRSA_PORT"] == "8000"


def test_gpu_toggle():
    gpu = server(render())
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    spec = one(render(), "Deployment")["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    docs = render(example("cpu"))
    cpu_spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(cpu_spec)
    two = server(render({"gpu": {"count": 2}}))
    assert two["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "--tensor-parallel-size=2" in two["args"]
    docs = render(example("gpu-tensor-parallel"))
    four = server(docs)
    assert four["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert "--tensor-parallel-size=4" in four["args"]
    volumes = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"medium": "Memory", "sizeLimit": "32Gi"} in [v.get("emptyDir") for v in volumes]


def test_lagkv_configmap_feeds_the_flags():
    docs = render({"lagkv": {"sink": 64, "lag": 512, "ratio": 0.5}})
    data = one(docs, "ConfigMap")["data"]
    assert data == {"LAGKV_ENABLED": "true", "LAGKV_SINK": "64", "LAGKV_LAG": "512",
                    "LAGKV_RATIO": "0.5", "LAGKV_SCORE_V_RATIO": "1"}  # fmt: skip
    c = server(docs)
    assert c["envFrom"] == [{"configMapRef": {"name": one(docs, "ConfigMap")["metadata"]["name"]}}]
    assert "--sink=$(LAGKV_SINK)" in c["args"] and "--ratio=$(LAGKV_RATIO)" in c["args"]
    # New settings roll the pods (flags are read at start).
    before = one(render(), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    after = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert before["checksum/lagkv"] != after["checksum/lagkv"]
    assert "--no-lagkv" in server(render({"lagkv": {"enabled": False}}))["args"]
    from_ckpt = server(render({"lagkv": {"fromCheckpoint": True}}))["args"]
    assert not [a for a in from_ckpt if a.startswith(("--sink", "--lag", "--ratio", "--no-lagkv"))]


def test_api_key_secret_or_existing():
    assert not by_kind(render(), "Secret")
    assert "LRSA_API_KEY" not in env_of(server(render()))
    docs = render({"apiKey": {"value": "s3cret"}})
    secret = one(docs, "Secret")
    ref = next(e for e in server(docs)["env"] if e["name"] == "LRSA_API_KEY")["valueFrom"]
    assert ref["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "api-key"}
    docs = render({"apiKey": {"existingSecret": "mine", "existingSecretKey": "token"}})
    assert not by_kind(docs, "Secret")
    ref = next(e for e in server(docs)["env"] if e["name"] == "LRSA_API_KEY")["valueFrom"]
    assert ref["secretKeyRef"] == {"name": "mine", "key": "token"}
    # The helm test pod authenticates the same way.
    test_pod = one(docs, "Pod")["spec"]["containers"][0]
    assert test_pod["env"][0]["valueFrom"] == ref


def test_model_volume_claim():
    docs = render()
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volume = next(v for v in pod_specs(docs)[0]["volumes"] if v["name"] == "models")
    assert volume["persistentVolumeClaim"] == {"claimName": pvc["metadata"]["name"],
                                               "readOnly": True}  # fmt: skip
    # RWO volume: no surge pod that could not mount it.
    assert one(docs, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    existing = render({"modelVolume": {"existingClaim": "llm-models"}})
    assert not by_kind(existing, "PersistentVolumeClaim")
    assert "llm-models" in str(pod_specs(existing)[0]["volumes"])


def test_optional_objects():
    docs = render(example("gpu"))
    ingress = one(docs, "Ingress")
    assert ingress["spec"]["tls"][0]["hosts"] == ["llm.example.com"]
    assert one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["path"] == "/metrics"
    hpa = one(render({"autoscaling": {"hpa": {"enabled": True}}}), "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert not by_kind(render({"podDisruptionBudget": {"enabled": False}}), "PodDisruptionBudget")
    # A single replica can still be drained; minAvailable instead when asked for.
    assert one(render(), "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    pdb = render({"podDisruptionBudget": {"minAvailable": "50%", "maxUnavailable": None}})
    assert one(pdb, "PodDisruptionBudget")["spec"]["minAvailable"] == "50%"
    assert not by_kind(render({"tests": {"enabled": False}}), "Pod")


def test_keda_scales_on_queue_depth():
    docs = render(example("autoscaling-keda"), namespace="llm")
    scaled = one(docs, "ScaledObject")
    deployment = one(docs, "Deployment")
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    name = deployment["metadata"]["name"]
    assert trigger["metadata"]["query"] == (
        f'sum(vllm:num_requests_waiting{{namespace="llm",service="{name}"}})'
    )
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_pipeline_serves_what_the_job_writes():
    docs = render(example("training-pipeline"))
    job = one(docs, "Job")
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][2]
    init = one(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    served = env_of(server(docs))["LRSA_MODEL"]
    marker = f"{served}/.lrsa-train-complete"
    assert served.startswith("/models/checkpoints/")
    # Clients see a stable model name, not the hashed folder's.
    assert "--served-model-name=SmolLM2-135M-Instruct-lrsa" in server(docs)["args"]
    assert f'out="{served}"' in script and f'marker="{marker}"' in script
    assert f'marker="{marker}"' in init["args"][2]
    assert "torchrun --standalone --nnodes=1 --nproc-per-node=2" in script
    assert (
        job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        == 2
    )
    # Same settings: same Job and folder; other settings: a new Job trains into a new folder.
    again = render(example("training-pipeline"))
    assert one(again, "Job")["metadata"]["name"] == job["metadata"]["name"]
    changed = example("training-pipeline")
    changed["lagkv"]["ratio"] = 0.5
    other = render(changed)
    assert one(other, "Job")["metadata"]["name"] != job["metadata"]["name"]
    assert env_of(server(other))["LRSA_MODEL"] != served
    # Training alone: a Job, and the server keeps serving model.path without waiting.
    alone = render({"training": {"enabled": True}})
    assert by_kind(alone, "Job") and "initContainers" not in str(one(alone, "Deployment"))
    assert env_of(server(alone))["LRSA_MODEL"] == "/models/SmolLM2-135M-Instruct"


# ---- the scripts and flags in the manifests work with the real programs ----


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_training_job_script_runs(tmp_path):
    """The Job's shell script, with the volume path moved under tmp_path and a torchrun stand-in
    that checks the flags with `lrsa train`'s own parser: trains once, then is a no-op."""
    values = example("training-pipeline")
    values["modelVolume"]["mountPath"] = str(tmp_path / "models")
    docs = render(values)
    job = one(docs, "Job")["spec"]["template"]["spec"]["containers"][0]
    script = job["args"][2]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # torchrun ARGS -m MODULE REST: parse REST as `lrsa` would, write a model file into --out.
    parse = (
        "import sys; from lrsa_serve.cli import build_parser; "
        "a = build_parser().parse_args(sys.argv[1:]); "
        "assert a.command == 'train' and a.resume and a.steps == 200, a; "
        "open(a.out_dir + '/config.json', 'w').write('{}'); print('lagkv', a.sink, a.lag, a.ratio)"
    )
    _stub(bin_dir, "torchrun", f'while [ "$1" != "-m" ]; do shift; done; shift 2\n'
                               f'exec {shlex.quote(sys.executable)} -c "{parse}" "$@"')  # fmt: skip
    cm = one(docs, "ConfigMap")["data"]
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", **cm)
    first = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "lagkv 32 256 0.25" in first.stdout and "trained:" in first.stdout
    out = Path(env_of(server(docs))["LRSA_MODEL"])
    assert (out / "config.json").is_file() and (out / ".lrsa-train-complete").is_file()
    second = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)
    assert second.returncode == 0 and "already trained" in second.stdout
    # The init container's wait ends as soon as the marker exists.
    init = one(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    waited = subprocess.run(["sh", "-c", init["args"][2]], capture_output=True, text=True,
                            timeout=20)  # fmt: skip
    assert waited.returncode == 0 and "checkpoint ready" in waited.stdout


def test_server_args_parse_with_lrsa_serve():
    """The Deployment's flags, with $(LAGKV_*) expanded as the kubelet does, are accepted by
    `lrsa serve`'s parser (vLLM's flags plus LagKV's) and mean what the values say."""
    pytest.importorskip("vllm")
    from lrsa_serve.serving.cli import build_parser

    values = helmtool.merge(example("gpu"), {"server": {"corsOrigins": ["https://a.example"]}})
    docs = render(values)
    cm = one(docs, "ConfigMap")["data"]
    c = server(docs)
    args = []
    for arg in c["args"]:
        for key, value in cm.items():
            arg = arg.replace(f"$({key})", value)
        args.append(arg)
    parsed = build_parser().parse_args([env_of(c)["LRSA_MODEL"], *args])
    assert (parsed.sink, parsed.lag, parsed.ratio, parsed.score_v_ratio) == (32, 1024, 0.25, 1.0)
    assert parsed.max_model_len == 32768 and parsed.max_num_seqs == 64
    assert parsed.gpu_memory_utilization == 0.9 and parsed.dtype == "bfloat16"
    assert parsed.max_tokens_cap == 1024
    assert parsed.served_model_name == ["qwen2.5-7b-lagkv"]
    assert parsed.cors_origins == ["https://a.example"]


# ---- values that values.schema.json or the chart's own checks refuse ----

SCHEMA_REJECTS = {
    "ratio zero": {"lagkv": {"ratio": 0}},
    "ratio above one": {"lagkv": {"ratio": 1.5}},
    "ratio as string": {"lagkv": {"ratio": "0.25"}},
    "sink not a block multiple": {"lagkv": {"sink": 20}},
    "negative lag": {"lagkv": {"lag": -256}},
    "unknown top-level key": {"replicas": 2},
    "unknown nested key": {"lagkv": {"window": 256}},
    "floating image tag": {"image": {"tag": "latest"}},
    "bad pull policy": {"image": {"pullPolicy": "Sometimes"}},
    "zero GPUs": {"gpu": {"count": 0}},
    "privileged port": {"server": {"port": 80}},
    "bad dtype": {"server": {"dtype": "int4"}},
    "gpu utilization above one": {"server": {"gpuMemoryUtilization": 1.2}},
    "root allowed": {"podSecurityContext": {"runAsNonRoot": False}},
    "privilege escalation": {"securityContext": {"allowPrivilegeEscalation": True}},
    "capabilities kept": {"securityContext": {"capabilities": {"drop": ["NET_RAW"]}}},
    "bad service type": {"service": {"type": "Headless"}},
    "relative model path": {"model": {"path": "models/x"}},
    "bad access mode": {"modelVolume": {"accessModes": ["ReadWriteSometimes"]}},
    "bad quantity": {"resources": {"limits": {"memory": "lots"}}},
    "zero training processes": {"training": {"nprocPerNode": 0}},
    "absolute output dir": {"training": {"outputDir": "/elsewhere"}},
    "keda threshold not a number": {"autoscaling": {"keda": {"threshold": "many"}}},
}


@pytest.mark.parametrize("values", SCHEMA_REJECTS.values(), ids=SCHEMA_REJECTS.keys())
def test_schema_rejects(values):
    with pytest.raises(helm.HelmValuesError):
        helmtool.render(values)


CHART_REJECTS = {
    "hpa and keda": ({"autoscaling": {"hpa": {"enabled": True}, "keda": {"enabled": True}}},
                     "either hpa or keda"),
    "pdb min and max": ({"podDisruptionBudget": {"minAvailable": 1}}, "not both"),
    "cpu lag not a 32 multiple": ({"gpu": {"enabled": False}, "lagkv": {"lag": 272}},
                                  "multiples of the KV block size 32"),
    "keep not a block multiple": ({"lagkv": {"lag": 256, "ratio": 0.3}}, "keep"),
    "pipeline without volume": ({"pipeline": {"enabled": True}, "modelVolume": {"enabled": False}},
                                "model volume"),
    "model outside the volume": ({"model": {"path": "/data/m"}}, "neither under"),
    "no volume, model not baked": ({"modelVolume": {"enabled": False}}, "baked into the image"),
}  # fmt: skip


@pytest.mark.parametrize("values,message", CHART_REJECTS.values(), ids=CHART_REJECTS.keys())
def test_chart_rejects(values, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        helmtool.render(values)


def test_helmtool_cli(capsys):
    example_file = str(CHART / "examples" / "cpu.yaml")
    assert helmtool.main(["-f", example_file, "--validate", "--kube-version", "1.33"]) == 0
    out, err = capsys.readouterr()
    assert "kind: Deployment" in out and "valid: 6 objects" in err
    assert helmtool.main(["--set", "image.tag=latest"]) == 1
    assert "render failed" in capsys.readouterr().err
