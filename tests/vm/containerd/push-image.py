#!/usr/bin/env python3
"""Push overlaybd layer blobs to a registry as one image, the way the
accelerated-container-image convertor lays it out, so the overlaybd
snapshotter pulls it lazily: each layer's descriptor carries the
`containerd.io/snapshot/overlaybd/blob-digest` and `.../blob-size`
annotations (containerd passes `containerd.io/snapshot/*` annotations on
to the snapshotter as labels; with them and the image-ref label from
`ctr rpull` the snapshotter marks the layer remote and never downloads it).

    push-image.py REGISTRY_URL REPO TAG LAYER_BLOB... [--cmd ARG]...

Prints the manifest digest. Plain HTTP, no auth (a local docker-registry).
"""
import hashlib
import json
import sys
import urllib.request

SNAP = "containerd.io/snapshot/overlaybd/"


def req(method, url, data=None, headers=None):
    r = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(r, timeout=60) as resp:
        return resp.status, resp.headers, resp.read()


def push_blob(base, repo, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    try:
        req("HEAD", f"{base}/v2/{repo}/blobs/{digest}")
        return digest
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
    _, headers, _ = req("POST", f"{base}/v2/{repo}/blobs/uploads/")
    loc = headers["Location"]
    if loc.startswith("/"):
        loc = base + loc
    sep = "&" if "?" in loc else "?"
    req("PUT", f"{loc}{sep}digest={digest}", data,
        {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
    return digest


def main():
    args = sys.argv[1:]
    cmd = []
    while "--cmd" in args:
        i = args.index("--cmd")
        cmd.append(args[i + 1])
        del args[i:i + 2]
    base, repo, tag, *blobs = args
    layers = []
    for path in blobs:
        data = open(path, "rb").read()
        digest = push_blob(base, repo, data)
        layers.append({
            # An overlaybd blob is an uncompressed tar (the ZFile inside a
            # pax-headed tar), so its diff ID is its own digest.
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest,
            "size": len(data),
            "annotations": {SNAP + "blob-digest": digest, SNAP + "blob-size": str(len(data))},
        })
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin:/usr/bin:/sbin:/usr/sbin"], "Cmd": cmd or None},
        "rootfs": {"type": "layers", "diff_ids": [l["digest"] for l in layers]},
        "history": [{"created_by": f"obd test layer {i}"} for i in range(len(layers))],
    }
    config_data = json.dumps(config).encode()
    config_digest = push_blob(base, repo, config_data)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": len(config_data)},
        "layers": layers,
    }
    data = json.dumps(manifest).encode()
    req("PUT", f"{base}/v2/{repo}/manifests/{tag}", data,
        {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    print("sha256:" + hashlib.sha256(data).hexdigest())


if __name__ == "__main__":
    main()
