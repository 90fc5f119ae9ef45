# shellcheck shell=bash
# Host files copied into a tree that a program can run chrooted in (sourced,
# not run; no side effects). Used by trace.sh (in the VM) and by
# scripts/bench-startup.sh (on the host). Needs $PY.

# copy_into_root ROOT LIST: copy the files named in LIST (one absolute path
# a line; a path that does not exist is passed over) into ROOT at their real
# paths. A symlink is copied as a link, and what it points to as well; a
# directory is made; a file keeps its mode and times. The merged-/usr links
# of / (/bin -> usr/bin, /lib, /lib64, /sbin) are made in ROOT first.
copy_into_root() {
    "$PY" - "$1" "$2" <<'PY'
import os, shutil, sys
root, listing = sys.argv[1:]
os.makedirs(root, exist_ok=True)
for top in os.listdir("/"):
    if os.path.islink("/" + top) and not os.path.lexists(f"{root}/{top}"):
        target = os.readlink("/" + top)
        os.symlink(target, f"{root}/{top}")
        os.makedirs(os.path.join(root, target.lstrip("/")), exist_ok=True)
def place(path):
    real_dir = os.path.realpath(os.path.dirname(path))
    path = os.path.join(real_dir, os.path.basename(path))
    dst = root + path
    if os.path.lexists(dst):
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), dst)
        place(os.path.normpath(os.path.join(real_dir, os.readlink(path))))
    elif os.path.isdir(path):
        os.makedirs(dst, exist_ok=True)
    elif os.path.isfile(path):
        shutil.copy2(path, dst)
n = 0
for line in open(listing):
    path = line.rstrip("\n")
    if path.startswith("/") and os.path.lexists(path):
        place(path)
        n += 1
print(f"{n} paths copied into {root}", file=sys.stderr)
PY
}
