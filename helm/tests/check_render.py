#!/usr/bin/env python3
"""Checks what `helm template` rendered for 2 GPU learners and 4 actors.

Usage: check_render.py RENDERED.yaml NAMESPACE

The learner StatefulSet's pods must each get a distinct rank (the pod ordinal,
through the downward API) and the same rendezvous address (rank 0's stable
DNS name behind the headless Service); actors must know every learner. The
pods are resolved here the way the kubelet would: the StatefulSet controller
sets the label apps.kubernetes.io/pod-index to each pod's ordinal.
"""
import sys

import yaml


def fail(msg):
    print(f"check_render: {msg}", file=sys.stderr)
    sys.exit(1)


def env_of(container, pod_labels):
    out = {}
    for e in container.get("env", []):
        if "value" in e:
            out[e["name"]] = str(e["value"])
        elif "valueFrom" in e and "fieldRef" in e["valueFrom"]:
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            prefix = "metadata.labels['"
            if path == "metadata.name":
                out[e["name"]] = "<pod name>"
            elif path.startswith(prefix):
                out[e["name"]] = pod_labels.get(path[len(prefix):-2])
            else:
                fail(f"{e['name']}: unexpected fieldRef {path}")
        else:
            out[e["name"]] = "<secret>"
    return out


def main(path, ns):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
        if d["metadata"].get("namespace") != ns:
            fail(f"{d['kind']}/{d['metadata']['name']} is not in namespace {ns}")
        sel = d.get("spec", {}).get("selector", {})
        labels = sel.get("matchLabels", sel) if isinstance(sel, dict) else {}
        if labels and "app.kubernetes.io/instance" not in labels:
            fail(f"{d['kind']}/{d['metadata']['name']}: selector without the release label")

    learners = [s for s in by_kind.get("StatefulSet", []) if s["metadata"]["name"].endswith("-learner")]
    if len(learners) != 1:
        fail("no learner StatefulSet")
    sts = learners[0]
    replicas = sts["spec"]["replicas"]
    if replicas != 2:
        fail(f"learner replicas {replicas}, want 2")
    svc = [s for s in by_kind["Service"] if s["metadata"]["name"] == sts["spec"]["serviceName"]]
    if not svc or svc[0]["spec"].get("clusterIP") != "None" or not svc[0]["spec"].get("publishNotReadyAddresses"):
        fail("the learners' Service must be headless and publish not-ready addresses")
    pod = sts["spec"]["template"]
    container = pod["spec"]["containers"][0]
    rdv_port = [p["containerPort"] for p in container["ports"] if p["name"] == "rendezvous"][0]
    want_rdv = f"{sts['metadata']['name']}-0.{svc[0]['metadata']['name']}.{ns}.svc:{rdv_port}"
    weights_port = [p["containerPort"] for p in container["ports"] if p["name"] == "weights"][0]
    want_weights = f"{sts['metadata']['name']}-0.{svc[0]['metadata']['name']}.{ns}.svc:{weights_port}"
    if weights_port not in [p["port"] for p in svc[0]["spec"]["ports"]]:
        fail(f"the learners' Service does not expose the weights broadcast port {weights_port}")

    ranks, rendezvous, weights = [], set(), set()
    for ordinal in range(replicas):
        labels = dict(pod["metadata"]["labels"], **{"apps.kubernetes.io/pod-index": str(ordinal)})
        env = env_of(container, labels)
        ranks.append(env["SLUICE_RANK"])
        rendezvous.add(env["SLUICE_RENDEZVOUS"])
        weights.add(env["SLUICE_WEIGHTS_BROADCAST"])
        if env["SLUICE_WORLD_SIZE"] != str(replicas):
            fail(f"pod {ordinal}: SLUICE_WORLD_SIZE {env['SLUICE_WORLD_SIZE']}")
        if env.get("NCCL_DEBUG") != "WARN" or env.get("SLUICE_COLLECTIVE") != "nccl":
            fail(f"pod {ordinal}: NCCL settings not passed through: {env}")
    if ranks != [str(i) for i in range(replicas)]:
        fail(f"ranks {ranks}: want one distinct rank per pod ordinal")
    if rendezvous != {want_rdv}:
        fail(f"rendezvous {rendezvous}: want every rank to use {want_rdv}")
    if weights != {want_weights}:
        fail(f"weights broadcast {weights}: want every rank to name rank 0's, {want_weights}")
    limits = container["resources"]["limits"]
    if str(limits.get("nvidia.com/gpu")) != "1":
        fail(f"learner GPU limit {limits}")
    shm = [v for v in pod["spec"]["volumes"] if v["name"] == "dshm"]
    if not shm or shm[0]["emptyDir"].get("medium") != "Memory":
        fail("no /dev/shm memory volume")
    if "checksum/config" not in pod["metadata"].get("annotations", {}):
        fail("no config checksum annotation on the learner pods")

    actors = [d for d in by_kind["Deployment"] if d["metadata"]["name"].endswith("-actor")][0]
    if actors["spec"]["replicas"] != 4:
        fail(f"actor replicas {actors['spec']['replicas']}, want 4")
    aenv = env_of(actors["spec"]["template"]["spec"]["containers"][0], {})
    urls = aenv["SLUICE_LEARNERS"].split(",")
    if len(urls) != replicas or any(f"-learner-{i}." not in u for i, u in enumerate(urls)):
        fail(f"actors' learners {urls}")
    print(f"check_render: ok — ranks {ranks}, rendezvous {want_rdv}, {len(urls)} learner endpoints for 4 actors")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
