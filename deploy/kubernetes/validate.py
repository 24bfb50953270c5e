"""Validates rendered OptiRoute manifests; run by scripts/validate-k8s.sh.

For each rendered overlay (`NAME=FILE`, the output of `kubectl kustomize`):
  - every Kubernetes object against the Kubernetes schemas of the
    `kubernetes-validate` package, strict (an unknown field is an error);
  - every KEDA ScaledObject against schemas/keda-scaledobject.json;
  - an object of a kind with no schema is an error, never skipped;
  - references inside the render: ScaledObject targets, ConfigMaps and
    Secret keys the pods read, the ports the probes and Service name.
It then writes, per overlay and role, what the pods will run with (the
config file, the environment with Secret values filled in, the ports, the
KEDA saturation divisor and JetStream names) as JSON into --facts DIR, for
e2e/tests/k8s_manifests.rs to load through the real config loader.

With --nats-values it also writes the server settings the NATS chart values
set (cluster, JetStream, `config.merge`, the accounts include) into a server
config and has `nats-server -t` check it.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError, VersionNotSupportedError


class Failures:
    def __init__(self):
        self.items = []

    def add(self, where, msg):
        item = f"{where}: {msg}"
        if item not in self.items:
            self.items.append(item)


def kn(doc):
    return f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"


def validate_schemas(name, docs, k8s_version, keda_schema, fail):
    keda = jsonschema.Draft202012Validator(keda_schema)
    for doc in docs:
        where = f"{name} {kn(doc)}"
        api = str(doc.get("apiVersion", ""))
        if api.startswith("keda.sh/"):
            if doc.get("kind") != "ScaledObject":
                fail.add(where, "no schema kept for this KEDA kind (only ScaledObject)")
                continue
            for e in sorted(keda.iter_errors(doc), key=lambda e: list(e.path)):
                path = ".".join(str(p) for p in e.path)
                fail.add(where, f"KEDA schema: {path}: {e.message}")
            continue
        try:
            kubernetes_validate.validate(doc, k8s_version, strict=True)
        except ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            fail.add(where, f"Kubernetes {e.version} schema: {path}: {e.message}")
        except SchemaNotFoundError as e:
            fail.add(where, e.message)
        except VersionNotSupportedError as e:
            sys.exit(f"validate: {e.message}")


def expand(value, env):
    """Kubernetes' $(VAR) expansion of an env value ($$ escapes)."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


def role_facts(name, docs, fail):
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d.get("kind"), {})[d["metadata"]["name"]] = d
    configmaps = by_kind.get("ConfigMap", {})
    secrets = by_kind.get("Secret", {})
    deployments = by_kind.get("Deployment", {})
    scaled = by_kind.get("ScaledObject", {})

    def secret_value(where, ref):
        s = secrets.get(ref.get("name"))
        if s is None:
            fail.add(where, f"Secret {ref.get('name')} is not in the render")
            return None
        data = dict(s.get("stringData") or {})
        if ref.get("key") not in data and ref.get("key") not in (s.get("data") or {}):
            fail.add(where, f"Secret {ref.get('name')} has no key {ref.get('key')}")
            return None
        return data.get(ref["key"], "<from data>")

    facts = []
    targets = {}
    for so in scaled.values():
        where = f"{name} {kn(so)}"
        spec = so.get("spec") or {}
        target = (spec.get("scaleTargetRef") or {}).get("name")
        if target not in deployments:
            fail.add(where, f"scaleTargetRef {target} is not a Deployment in the render")
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            fail.add(where, f"minReplicaCount {lo} is above maxReplicaCount {hi}")
        targets.setdefault(target, []).extend(spec.get("triggers") or [])

    for dname, dep in sorted(deployments.items()):
        where = f"{name} {kn(dep)}"
        role = dep["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        env = {}
        for src in c.get("envFrom") or []:
            ref = src.get("configMapRef")
            if ref:
                cm = configmaps.get(ref["name"])
                if cm is None:
                    fail.add(where, f"envFrom ConfigMap {ref['name']} is not in the render")
                else:
                    env.update(cm.get("data") or {})
        for e in c.get("env") or []:
            if "value" in e:
                env[e["name"]] = expand(str(e["value"]), env)
            elif "secretKeyRef" in (e.get("valueFrom") or {}):
                v = secret_value(where, e["valueFrom"]["secretKeyRef"])
                if v is not None:
                    env[e["name"]] = v
            else:
                fail.add(where, f"env {e['name']}: only value and secretKeyRef are understood here")
        config_toml = None
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts") or []}
        for v in pod.get("volumes") or []:
            cmref = v.get("configMap")
            if cmref:
                cm = configmaps.get(cmref["name"])
                if cm is None:
                    fail.add(where, f"volume ConfigMap {cmref['name']} is not in the render")
                    continue
                path = env.get("OPTIROUTE_CONFIG", "")
                mount = mounts.get(v["name"])
                if mount and path.startswith(mount.rstrip("/") + "/"):
                    key = path[len(mount.rstrip("/")) + 1:]
                    config_toml = (cm.get("data") or {}).get(key)
                    if config_toml is None:
                        fail.add(where, f"OPTIROUTE_CONFIG {path}: ConfigMap {cmref['name']} has no key {key}")
        if "OPTIROUTE_CONFIG" in env and config_toml is None:
            fail.add(where, f"OPTIROUTE_CONFIG {env['OPTIROUTE_CONFIG']} is not a mounted ConfigMap file")
        ports = {p["name"]: p["containerPort"] for p in c.get("ports") or []}
        # What every role must have (issue 18): probes on its admin port,
        # requests and limits, a PodDisruptionBudget.
        for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
            get = (c.get(probe) or {}).get("httpGet") or {}
            if get.get("path") != path or get.get("port") != "admin":
                fail.add(where, f"{probe} must GET {path} on the admin port")
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            missing = [r for r in ("cpu", "memory") if r not in (res.get(kind) or {})]
            if missing:
                fail.add(where, f"resources.{kind} has no {', '.join(missing)}")
        labels = dep["spec"]["template"]["metadata"].get("labels") or {}
        if not any(all(labels.get(k) == v for k, v in ((pdb["spec"].get("selector") or {}).get("matchLabels") or {}).items())
                   and (pdb["spec"].get("selector") or {}).get("matchLabels")
                   for pdb in by_kind.get("PodDisruptionBudget", {}).values()):
            fail.add(where, "no PodDisruptionBudget selects its pods")
        for probe in ("readinessProbe", "livenessProbe"):
            get = (c.get(probe) or {}).get("httpGet") or {}
            port = get.get("port")
            if isinstance(port, str) and port not in ports:
                fail.add(where, f"{probe} names port {port}, which the container does not declare")
        saturation = None
        jetstream = None
        for t in targets.get(dname, []):
            md = t.get("metadata") or {}
            if t.get("type") == "prometheus":
                q = md.get("query", "")
                m = re.fullmatch(r'\s*sum\(optiroute_in_flight_requests\{([^}]*)\}\)\s*/\s*(\d+)\s*', q)
                if not m or f'service="{dname}"' not in m.group(1):
                    fail.add(where, f"KEDA query is not sum(optiroute_in_flight_requests{{service=\"{dname}\"}}) / <capacity>: {q}")
                else:
                    saturation = int(m.group(2))
            elif t.get("type") == "nats-jetstream":
                jetstream = {"stream": md.get("stream"), "consumer": md.get("consumer"),
                             "account": md.get("account")}
        facts.append({
            "overlay": name, "deployment": dname, "role": role,
            "command": c.get("command"), "config_toml": config_toml, "env": env,
            "ports": ports, "admin_port": ports.get("admin"), "http_port": ports.get("http"),
            "saturation_divisor": saturation, "jetstream": jetstream,
        })
    for svc in by_kind.get("Service", {}).values():
        where = f"{name} {kn(svc)}"
        sel = svc["spec"].get("selector") or {}
        matched = [f for f in facts if all(
            deployments[f["deployment"]]["spec"]["template"]["metadata"]["labels"].get(k) == v
            for k, v in sel.items())]
        if not matched:
            fail.add(where, "selects no Deployment's pods")
        for p in svc["spec"].get("ports") or []:
            tp = p.get("targetPort")
            if isinstance(tp, str) and any(tp not in f["ports"] for f in matched):
                fail.add(where, f"targetPort {tp} is not declared by the pods it selects")
    return facts


def check_nats_values(path, accounts, nats_server, fail):
    """The server settings our chart values set, checked by nats-server -t."""
    values = yaml.safe_load(open(path))
    cfg = values.get("config") or {}
    where = f"NATS values {path}"
    cl, js = cfg.get("cluster") or {}, cfg.get("jetstream") or {}
    if not (cl.get("enabled") and cl.get("replicas") == 3):
        fail.add(where, "config.cluster must be enabled with 3 replicas")
    if not (js.get("enabled") and (js.get("fileStore") or {}).get("enabled", True)):
        fail.add(where, "config.jetstream must be enabled with file storage")
    if (js.get("merge") or {}).get("sync_interval") != "always":
        fail.add(where, "config.jetstream.merge.sync_interval must be `always`")

    def units(v):
        # The chart's `<< 1MB >>` writes an unquoted NATS value.
        if isinstance(v, str):
            m = re.fullmatch(r"<<\s*(.*?)\s*>>", v)
            if m:
                return ("raw", m.group(1))
        return v

    def conf(v, indent=""):
        v = units(v)
        if isinstance(v, tuple):
            return v[1]
        if isinstance(v, dict):
            inner = "".join(f"{indent}  {json.dumps(k)}: {conf(x, indent + '  ')}\n" for k, x in v.items())
            return "{\n" + inner + indent + "}"
        if isinstance(v, list):
            return "[" + ", ".join(conf(x, indent) for x in v) + "]"
        return json.dumps(v)

    merge = dict(cfg.get("merge") or {})
    includes = [merge.pop(k) for k in sorted(list(merge)) if k.endswith("$include")]
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "nats-config"))
        os.makedirs(os.path.join(d, "nats-accounts"))
        with open(accounts) as src, open(os.path.join(d, "nats-accounts", "accounts.conf"), "w") as dst:
            dst.write(src.read())
        server = {
            "server_name": "nats-0", "port": 4222,
            "http_port": (cfg.get("monitor") or {}).get("port", 8222),
            "cluster": {"name": "nats", "port": 6222, "no_advertise": True,
                        "routes": [f"nats://nats-{i}.nats-headless:6222" for i in range(cl.get("replicas", 1))]},
            "jetstream": {"store_dir": os.path.join(d, "data"), "max_memory_store": 0,
                          **(js.get("merge") or {})},
        }
        server.update(merge)
        lines = [f"{json.dumps(k)}: {conf(v)}" for k, v in server.items()]
        lines += [f"include {json.dumps(i)}" for i in includes]
        conf_path = os.path.join(d, "nats-config", "nats.conf")
        with open(conf_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        r = subprocess.run([nats_server, "-t", "-c", conf_path], capture_output=True, text=True)
        if r.returncode != 0:
            fail.add(where, "nats-server -t: " + (r.stderr or r.stdout).strip())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("renders", nargs="+", help="NAME=FILE, a rendered overlay")
    ap.add_argument("--kubernetes-version", default="1.33")
    ap.add_argument("--keda-schema", required=True)
    ap.add_argument("--facts", help="directory for the per-role facts (JSON)")
    ap.add_argument("--nats-values")
    ap.add_argument("--nats-accounts")
    ap.add_argument("--nats-server")
    a = ap.parse_args()

    keda_schema = json.load(open(a.keda_schema))
    fail = Failures()
    all_facts = []
    for r in a.renders:
        name, _, path = r.partition("=")
        docs = [d for d in yaml.safe_load_all(open(path)) if d]
        if not docs:
            fail.add(name, "renders no objects")
            continue
        validate_schemas(name, docs, a.kubernetes_version, keda_schema, fail)
        all_facts += role_facts(name, docs, fail)
        kinds = sorted({d["kind"] for d in docs})
        print(f"validate: {name}: {len(docs)} objects ({', '.join(kinds)})")
    if a.nats_values:
        check_nats_values(a.nats_values, a.nats_accounts, a.nats_server, fail)
        print(f"validate: NATS values {a.nats_values} checked with nats-server -t")
    if a.facts:
        os.makedirs(a.facts, exist_ok=True)
        with open(os.path.join(a.facts, "roles.json"), "w") as f:
            json.dump(all_facts, f, indent=1)
    for item in fail.items:
        print(f"INVALID {item}", file=sys.stderr)
    if fail.items:
        print(f"validate: {len(fail.items)} problem(s)", file=sys.stderr)
        sys.exit(1)
    print("validate: all manifests valid")


if __name__ == "__main__":
    main()
