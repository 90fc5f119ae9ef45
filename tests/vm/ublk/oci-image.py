#!/usr/bin/env python3
"""The OCI image of the convert VM suite (convert.sh), and the two trees it
is checked against. Standard library only; run as root (devices, owners).

  oci-image.py layers DIR         write DIR/layer{0,1,2}.tar and the blobs:
                                  0 = python3.11 with its shared libraries
                                  and /usr/lib/python3.11 (gzip), 1 = every
                                  tar entry kind (plain tar), 2 = whiteouts
                                  and replacements (gzip)
  oci-image.py push URL REPO TAG DIR   push DIR's image to a registry
  oci-image.py layout DIR OUT TAG  write DIR's image as an OCI layout OUT
                                  (blobs hard-linked; scripts/bench-convert.sh
                                  makes DIR of its own layers)
  oci-image.py fetch URL REPO TAG DIR  download an image's manifest and
                                  layer blobs (DIR/layerN.blob)
  oci-image.py apply ROOT TAR...  apply layer tars to directory ROOT by the
                                  image-spec rules, with the kernel's own
                                  file operations (tarfile + whiteouts)
  oci-image.py compare WANT HAVE  compare two trees: names, types, modes,
                                  owners, sizes, contents, link targets,
                                  device numbers, xattrs, hard links. Each
                                  is a directory or a raw ext4 image (read
                                  with debugfs, no kernel mount).
"""
import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import urllib.request

PYTHON = "/usr/bin/python3.11"
PYLIB = "/usr/lib/python3.11"
MTIME = 1_700_000_000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


# ------------------------------------------------------------ the layers
class Layer:
    def __init__(self):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)
        self.added = set()

    def entry(self, name, kind=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, data=b"",
              link="", dev=(0, 0), xattrs=None):
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kind, mode, uid, gid, MTIME
        ti.linkname = link
        ti.devmajor, ti.devminor = dev
        ti.size = len(data) if kind == tarfile.REGTYPE else 0
        if xattrs:
            ti.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
                              for k, v in xattrs.items()}
        self.tar.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        return self

    def host(self, path):
        """Add host path `path` (absolute) as it is, its parents first."""
        name = path.lstrip("/")
        if not name or name in self.added:
            return
        self.host(os.path.dirname(path))
        self.added.add(name)
        self.tar.add(path, arcname=name, recursive=False)

    def host_file(self, path):
        """Add `path` at its real location, and what a symlink points to."""
        real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        self.host(real)
        if os.path.islink(real):
            self.host_file(os.path.normpath(os.path.join(os.path.dirname(real), os.readlink(real))))

    def close(self):
        self.tar.close()
        return self.buf.getvalue()


def python_layer():
    layer = Layer()
    # The merged-/usr links of / (bin -> usr/bin, lib -> usr/lib, ...).
    for top in sorted(os.listdir("/")):
        if os.path.islink("/" + top) and os.readlink("/" + top).startswith("usr/"):
            layer.host("/" + top)
    libs = subprocess.run(["ldd", PYTHON], check=True, capture_output=True, text=True).stdout
    for line in libs.splitlines():
        for word in line.split():
            if word.startswith("/"):
                layer.host_file(word)
    layer.host_file("/usr/bin/python3")
    for d, dirs, files in os.walk(PYLIB):
        # libpython's static archive and build files: 25 MB nobody runs.
        dirs[:] = sorted(x for x in dirs if not x.startswith("config-"))
        layer.host(d)
        for f in sorted(files):
            layer.host(os.path.join(d, f))
    return layer.close()


CAP_NET_BIND_SERVICE = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


def kinds_layer():
    t = tarfile
    layer = Layer()
    layer.entry("kinds", t.DIRTYPE, 0o750, 1000, 1000, xattrs={"user.dir": b"1"})
    layer.entry("kinds/setuid", mode=0o4755, data=b"#!/bin/sh\necho setuid\n")
    layer.entry("kinds/setgid", mode=0o2711, data=b"setgid\n")
    layer.entry("kinds/sticky", t.DIRTYPE, 0o1777)
    layer.entry("kinds/empty", mode=0o600, uid=65534, gid=65534)
    layer.entry("kinds/big-ids", uid=70000, gid=70001, data=b"ids above 65535\n")
    layer.entry("kinds/random.bin", data=b"".join(
        hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(3 << 15)))
    layer.entry("kinds/xattrs.txt", data=b"with xattrs\n", xattrs={
        "user.text": "a value é".encode(),
        "user.binary": bytes(range(256)) * 2,
        "security.capability": CAP_NET_BIND_SERVICE,
    })
    layer.entry("kinds/link-rel", t.SYMTYPE, 0o777, link="setuid")
    layer.entry("kinds/link-abs", t.SYMTYPE, 0o777, link="/usr/bin/python3.11")
    layer.entry("kinds/link-dangling", t.SYMTYPE, 0o777, link="nowhere/at/all")
    layer.entry("kinds/link-long", t.SYMTYPE, 0o777, link="x" * 150 + "/target")
    layer.entry("kinds/link-owned", t.SYMTYPE, 0o777, 1000, 1000, link="../kinds")
    layer.entry("kinds/hard1", data=b"three names, one inode\n")
    layer.entry("kinds/hard2", t.LNKTYPE, link="kinds/hard1")
    layer.entry("kinds/hard3", t.LNKTYPE, link="kinds/hard1")
    layer.entry("kinds/py-hard", t.LNKTYPE, link="usr/lib/python3.11/os.py")
    layer.entry("kinds/fifo", t.FIFOTYPE, 0o640)
    layer.entry("kinds/null", t.CHRTYPE, 0o666, dev=(1, 3))
    layer.entry("kinds/big-minor", t.CHRTYPE, 0o600, dev=(10, 300))
    layer.entry("kinds/loop9", t.BLKTYPE, 0o660, 0, 6, dev=(7, 9))
    layer.entry("kinds/" + "n" * 200, data=b"a 200-byte name (pax path)\n")
    layer.entry("kinds/" + "/".join("d%02d" % i for i in range(30)) + "/deep",
                data=b"30 levels down\n")
    layer.entry("kinds/héllo wörld ñ.txt", data="utf-8 name\n".encode())
    layer.entry("implicit/parents/file", data=b"parents without entries\n")
    # What layer 2 deletes or replaces.
    layer.entry("wh", t.DIRTYPE, 0o755)
    layer.entry("wh/gone.txt", data=b"whited out\n")
    layer.entry("wh/gonedir", t.DIRTYPE, 0o700)
    layer.entry("wh/gonedir/sub/x", data=b"under a whited-out dir\n")
    layer.entry("wh/keep.txt", data=b"stays\n")
    layer.entry("opq", t.DIRTYPE, 0o755, xattrs={"user.opq": b"lower"})
    layer.entry("opq/a", data=b"a\n")
    layer.entry("opq/sub/b", data=b"b\n")
    layer.entry("f2d", data=b"a file, then a directory\n")
    layer.entry("d2f/inside", data=b"a directory, then a file\n")
    layer.entry("sym2file", t.SYMTYPE, 0o777, link="wh/keep.txt")
    layer.entry("file2sym", data=b"a file, then a symlink\n")
    layer.entry("modify.txt", mode=0o644, data=b"before\n")
    return layer.close()


def whiteout_layer():
    t = tarfile
    layer = Layer()
    layer.entry("wh/.wh.gone.txt")
    layer.entry("wh/.wh.gonedir")
    layer.entry("wh/.wh.never-existed")
    layer.entry("opq/new-before", data=b"same layer, before the marker\n")
    layer.entry("opq", t.DIRTYPE, 0o700, xattrs={"user.opq": b"upper"})
    layer.entry("opq/.wh..wh..opq")
    layer.entry("opq/new-after", data=b"same layer, after the marker\n")
    layer.entry("f2d", t.DIRTYPE, 0o755)
    layer.entry("f2d/inside", data=b"now a directory\n")
    layer.entry("d2f", mode=0o600, data=b"now a file\n")
    layer.entry("sym2file", data=b"now a file\n")
    layer.entry("file2sym", t.SYMTYPE, 0o777, link="modify.txt")
    layer.entry("modify.txt", mode=0o600, uid=1000, gid=1000, data=b"after\n")
    layer.entry("kinds", t.DIRTYPE, 0o700, 1000, 1000, xattrs={"user.dir": b"2"})
    layer.entry("kinds/.wh.hard1")
    layer.entry("kinds/same-layer", data=b"followed by its own whiteout: stays\n")
    layer.entry("kinds/.wh.same-layer")
    layer.entry("usr/lib/python3.11/.wh.antigravity.py")
    layer.entry("usr/lib/python3.11/.wh.idlelib")
    layer.entry("usr/lib/python3.11/lib2to3/.wh..wh..opq")
    layer.entry("usr/lib/python3.11/lib2to3/README.obd", data=b"the only entry left\n")
    return layer.close()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def cmd_layers(out):
    os.makedirs(out, exist_ok=True)
    made = [(python_layer(), True), (kinds_layer(), False), (whiteout_layer(), True)]
    layers = []
    for i, (tar, gz) in enumerate(made):
        blob = gzip.compress(tar, compresslevel=1, mtime=0) if gz else tar
        open(f"{out}/layer{i}.tar", "wb").write(tar)
        open(f"{out}/layer{i}.blob", "wb").write(blob)
        kind = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gz else "")
        layers.append({"mediaType": kind, "digest": sha256(blob), "size": len(blob),
                       "diff_id": sha256(tar)})
        print(f"layer{i}: tar {len(tar)} bytes, blob {len(blob)} bytes", file=sys.stderr)
    json.dump(layers, open(f"{out}/layers.json", "w"), indent=1)


# ------------------------------------------------------------ registry
def request(url, method="GET", data=None, headers=None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status, dict(r.headers), r.read()


def upload(base, repo, digest, data):
    try:
        request(f"{base}/v2/{repo}/blobs/{digest}", "HEAD")
        return
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
    _, h, _ = request(f"{base}/v2/{repo}/blobs/uploads/", "POST", b"")
    loc = h["Location"]
    loc = loc if loc.startswith("http") else base + loc
    sep = "&" if "?" in loc else "?"
    request(f"{loc}{sep}digest={digest}", "PUT", data,
            {"Content-Type": "application/octet-stream"})


def image(src):
    """DIR's image: (config, manifest), both as bytes."""
    layers = json.load(open(f"{src}/layers.json"))
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/usr/bin/python3"]},
        "rootfs": {"type": "layers", "diff_ids": [l["diff_id"] for l in layers]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256(config), "size": len(config)},
        "layers": [{k: l[k] for k in ("mediaType", "digest", "size")} for l in layers],
    }).encode()
    return config, manifest


def cmd_push(base, repo, tag, src):
    config, manifest = image(src)
    upload(base, repo, sha256(config), config)
    for i, l in enumerate(json.load(open(f"{src}/layers.json"))):
        upload(base, repo, l["digest"], open(f"{src}/layer{i}.blob", "rb").read())
    request(f"{base}/v2/{repo}/manifests/{tag}", "PUT", manifest,
            {"Content-Type": OCI_MANIFEST})
    print(sha256(manifest))


def cmd_layout(src, out, tag):
    config, manifest = image(src)
    blobs = f"{out}/blobs/sha256"
    os.makedirs(blobs, exist_ok=True)
    for data in (config, manifest):
        open(f"{blobs}/{sha256(data)[7:]}", "wb").write(data)
    for i, l in enumerate(json.load(open(f"{src}/layers.json"))):
        dst = f"{blobs}/{l['digest'][7:]}"
        if not os.path.exists(dst):
            os.link(f"{src}/layer{i}.blob", dst)
    open(f"{out}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
    json.dump({"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": sha256(manifest), "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]},
        open(f"{out}/index.json", "w"))


def cmd_fetch(base, repo, tag, out):
    os.makedirs(out, exist_ok=True)
    _, _, body = request(f"{base}/v2/{repo}/manifests/{tag}",
                         headers={"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"})
    manifest = json.loads(body)
    open(f"{out}/manifest.json", "wb").write(body)
    for i, l in enumerate(manifest["layers"]):
        _, _, blob = request(f"{base}/v2/{repo}/blobs/{l['digest']}")
        if sha256(blob) != l["digest"] or len(blob) != l["size"]:
            sys.exit(f"layer {i}: the registry sent {len(blob)} bytes of {sha256(blob)}, "
                     f"the manifest says {l['size']} of {l['digest']}")
        open(f"{out}/layer{i}.blob", "wb").write(blob)


# ------------------------------------------------------------ tar-apply
def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def set_xattrs(path, ti):
    for name in os.listxattr(path, follow_symlinks=False):
        os.removexattr(path, name, follow_symlinks=False)
    for k, v in ti.pax_headers.items():
        if k.startswith("SCHILY.xattr."):
            os.setxattr(path, k[len("SCHILY.xattr."):], v.encode("utf-8", "surrogateescape"),
                        follow_symlinks=False)


def clean(name):
    return "/".join(c for c in name.split("/") if c not in ("", "."))


def apply_layer(root, tar_path):
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
        # Whiteouts first: they only delete what the lower layers left.
        for ti in members:
            name = clean(ti.name)
            d, base = os.path.split(name)
            if base == ".wh..wh..opq":
                target = os.path.join(root, d)
                if os.path.isdir(target) and not os.path.islink(target):
                    for child in os.listdir(target):
                        remove(os.path.join(target, child))
            elif base.startswith(".wh."):
                remove(os.path.join(root, d, base[4:]))
        for ti in members:
            name = clean(ti.name)
            if not name or os.path.basename(name).startswith(".wh."):
                continue
            ti.name = name
            path = os.path.join(root, name)
            parent = os.path.dirname(path)
            missing = []
            while not os.path.lexists(parent):
                missing.append(parent)
                parent = os.path.dirname(parent)
            for p in reversed(missing):
                os.mkdir(p, 0o755)
                os.chmod(p, 0o755)
            if ti.isdir() and os.path.isdir(path) and not os.path.islink(path):
                os.chown(path, ti.uid, ti.gid)
                os.chmod(path, ti.mode)
            else:
                remove(path)
                tar.extract(ti, root, set_attrs=True, numeric_owner=True)
            if not ti.issym() and not ti.islnk():
                set_xattrs(path, ti)


def cmd_apply(root, tars):
    os.makedirs(root, exist_ok=True)
    os.umask(0)
    for t in tars:
        apply_layer(root, t)


# ------------------------------------------------------------ scan and compare
KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
         stat.S_IFIFO: "fifo", stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev",
         stat.S_IFSOCK: "socket"}
IGNORED_XATTRS = {"security.selinux"}


def skipped(rel):
    return rel == "lost+found" or rel.startswith("lost+found/")


def scan_dir(root):
    tree = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            rel = os.path.relpath(p, root)
            if skipped(rel):
                continue
            st = os.lstat(p)
            kind = KINDS.get(stat.S_IFMT(st.st_mode), "other")
            e = {"type": kind, "mode": "%04o" % stat.S_IMODE(st.st_mode), "uid": st.st_uid,
                 "gid": st.st_gid, "ino": st.st_ino, "nlink": st.st_nlink, "xattrs": {}}
            if kind == "file":
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for b in iter(lambda: f.read(1 << 20), b""):
                        h.update(b)
                e["size"], e["sha256"] = st.st_size, h.hexdigest()
            elif kind == "symlink":
                e["target"] = os.fsencode(os.readlink(p)).hex()
            elif kind in ("chardev", "blockdev"):
                e["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
            for k in os.listxattr(p, follow_symlinks=False):
                e["xattrs"][k] = os.getxattr(p, k, follow_symlinks=False).hex()
            tree[os.fsencode(rel).hex()] = e
    return tree


def debugfs(image, cmds):
    """Run debugfs requests in one go; {request: [output lines]}."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cmds") as f:
        f.write(b"".join(c + b"\n" for c in cmds))
        f.flush()
        out = subprocess.run(["debugfs", "-f", f.name, image], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, check=True).stdout
    res, cur = {}, None
    for line in out.split(b"\n"):
        if line.startswith(b"debugfs: "):
            cur = line[9:]
            res[cur] = []
        elif cur is not None:
            res[cur].append(line)
    return res


def field(lines, key):
    for l in lines:
        i = l.find(key)
        if i >= 0:
            return l[i + len(key):].split()[0].decode()
    raise ValueError(f"no {key!r} in {lines!r}")


def scan_image(image):
    """The tree of a raw ext4 image, read with debugfs (no mount)."""
    info = {}
    level = [(b"", 2)]
    while level:                        # breadth first, one debugfs run per depth
        out = debugfs(image, [b"ls -p <%d>" % ino for _, ino in level])
        nxt = []
        for d, ino in level:
            for l in out[b"ls -p <%d>" % ino]:
                parts = l.split(b"/")    # /ino/mode/uid/gid/name/size/
                if len(parts) < 7:
                    continue
                name, cino = parts[5], int(parts[1])
                if name in (b".", b"..") or cino == 0:
                    continue
                rel = d + b"/" + name if d else name
                mode = int(parts[2], 8)
                if skipped(rel.decode("utf-8", "surrogateescape")):
                    continue
                info[rel] = (cino, mode, int(parts[3]), int(parts[4]))
                if stat.S_ISDIR(mode):
                    nxt.append((rel, cino))
        level = nxt
    tmp = tempfile.mkdtemp(prefix="oci-image.")
    inos = sorted({v[0] for v in info.values()})
    data = {v[0] for v in info.values() if stat.S_ISREG(v[1]) or stat.S_ISLNK(v[1])}
    cmds = []
    for ino in inos:
        cmds += [b"stat <%d>" % ino, b"ea_list <%d>" % ino]
        if ino in data:
            cmds.append(b"dump <%d> %s/%d" % (ino, tmp.encode(), ino))
    out = debugfs(image, cmds)
    names = {}
    for ino in inos:
        names[ino] = [l.strip().split(b" (")[0] for l in out[b"ea_list <%d>" % ino]
                      if l.strip() and not l.startswith(b"Extended attributes")]
    debugfs(image, [b"ea_get -f %s/ea.%d.%d <%d> %s" % (tmp.encode(), ino, i, ino, n)
                    for ino, ns in names.items() for i, n in enumerate(ns)])
    tree = {}
    for rel, (ino, mode, uid, gid) in info.items():
        st = out[b"stat <%d>" % ino]
        kind = KINDS.get(stat.S_IFMT(mode), "other")
        e = {"type": kind, "mode": "%04o" % stat.S_IMODE(mode), "uid": uid, "gid": gid,
             "ino": ino, "nlink": int(field(st, b"Links:")), "xattrs": {}}
        path = f"{tmp}/{ino}"
        if kind in ("file", "symlink"):
            body = open(path, "rb").read() if os.path.exists(path) else b""
            if kind == "file":
                e["size"], e["sha256"] = len(body), hashlib.sha256(body).hexdigest()
            else:
                fast = [l for l in st if l.startswith(b"Fast link dest: ")]
                if fast:
                    body = fast[0][len(b"Fast link dest: "):].rstrip()[1:-1]
                e["target"] = body.hex()
        elif kind in ("chardev", "blockdev"):
            e["rdev"] = [int(x) for x in field(st, b"Device major/minor number: ").split(":")]
        for i, n in enumerate(names[ino]):
            e["xattrs"][n.decode()] = open(f"{tmp}/ea.{ino}.{i}", "rb").read().hex()
        tree[rel.hex()] = e
    shutil.rmtree(tmp)
    return tree


def normalize(tree):
    """Inode numbers become the sorted names of each hard-linked file."""
    groups = {}
    for rel, e in tree.items():
        if e["type"] == "file":
            groups.setdefault(e["ino"], []).append(rel)
    for rel, e in tree.items():
        ino = e.pop("ino")
        if e["type"] == "file":
            e["names"] = sorted(groups[ino])
        else:
            e.pop("nlink")
        for k in IGNORED_XATTRS:
            e["xattrs"].pop(k, None)
    return tree


def scan(root):
    return normalize(scan_dir(root) if os.path.isdir(root) else scan_image(root))


def show(rel_hex):
    return bytes.fromhex(rel_hex).decode("utf-8", "backslashreplace")


def cmd_compare(want_root, have_root):
    want, have = scan(want_root), scan(have_root)
    bad = []
    for rel, w in sorted(want.items()):
        h = have.get(rel)
        if h is None:
            bad.append(f"missing: {show(rel)}")
        elif h != w:
            diff = "; ".join(f"{k} {h.get(k)!r:.200}, want {w.get(k)!r:.200}"
                             for k in sorted(set(w) | set(h)) if w.get(k) != h.get(k))
            bad.append(f"differs: {show(rel)}: {diff}")
    bad += [f"unexpected: {show(rel)}" for rel in sorted(set(have) - set(want))]
    kinds = {}
    for e in want.values():
        kinds[e["type"]] = kinds.get(e["type"], 0) + 1
    linked = sum(1 for e in want.values() if e["type"] == "file" and len(e["names"]) > 1)
    with_xattrs = sum(1 for e in want.values() if e["xattrs"])
    print(f"{len(want) - len(bad)}/{len(want)} entries match "
          f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}; "
          f"{linked} hard-linked names, {with_xattrs} with xattrs)")
    for line in bad[:20]:
        print(line)
    sys.exit(1 if bad or not want else 0)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "layers":
        cmd_layers(*args)
    elif cmd == "push":
        cmd_push(*args)
    elif cmd == "layout":
        cmd_layout(*args)
    elif cmd == "fetch":
        cmd_fetch(*args)
    elif cmd == "apply":
        cmd_apply(args[0], args[1:])
    elif cmd == "compare":
        cmd_compare(*args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
