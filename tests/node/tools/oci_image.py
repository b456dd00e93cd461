"""Write a one-layer container image as an OCI image layout tar, without a registry.

    python3 oci_image.py --rootfs DIR --name REF --out FILE [--entrypoint JSON]
                         [--cmd JSON] [--user USER] [--env K=V ...]

The layer is DIR's tree (owned by root, every time stamp 0, gzip without a name or time),
so the same tree gives the same digests. The archive holds oci-layout, index.json (the
manifest annotated with io.containerd.image.name=REF, which `ctr images import` names the
image by, and org.opencontainers.image.ref.name=the tag) and blobs/sha256/ (layer, config,
manifest). Stdlib only: build.sh runs it with the system's python3.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Root's, time 0, and modes that do not depend on the umask the tree was made with:
    folders 755 (1777 if sticky, like /tmp), files 755 if executable by the owner, else 644."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    if info.isdir():
        info.mode = 0o1777 if info.mode & 0o1000 else 0o755
    elif info.isreg():
        info.mode = 0o755 if info.mode & 0o100 else 0o644
    return info


def layer_tar(rootfs: Path) -> bytes:
    """DIR's tree as an uncompressed tar, entries sorted, paths relative to DIR."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(rootfs.rglob("*")):
            tar.add(path, arcname=path.relative_to(rootfs).as_posix(), recursive=False,
                    filter=_normalize)
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes, media_type: str) -> dict[str, object]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def image_files(rootfs: Path, name: str, entrypoint: list[str] | None,
                cmd: list[str] | None, user: str | None, env: list[str]) -> dict[str, bytes]:
    """The OCI layout's files by path in the archive."""
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    uncompressed = layer_tar(rootfs)
    blobs: dict[str, bytes] = {}
    layer = _blob(blobs, _gzip(uncompressed), LAYER)
    container_config: dict[str, object] = {"Env": env or [DEFAULT_PATH]}
    if entrypoint is not None:
        container_config["Entrypoint"] = entrypoint
    if cmd is not None:
        container_config["Cmd"] = cmd
    if user is not None:
        container_config["User"] = user
    config = _blob(blobs, _json({
        "architecture": "amd64",
        "os": "linux",
        "config": container_config,
        "rootfs": {"type": "layers",
                   "diff_ids": ["sha256:" + hashlib.sha256(uncompressed).hexdigest()]},
    }), CONFIG)
    manifest = _blob(blobs, _json({
        "schemaVersion": 2, "mediaType": MANIFEST, "config": config, "layers": [layer],
    }), MANIFEST)
    manifest["annotations"] = {"io.containerd.image.name": name,
                               "org.opencontainers.image.ref.name": tag}
    manifest["platform"] = {"architecture": "amd64", "os": "linux"}
    files = {"oci-layout": _json({"imageLayoutVersion": "1.0.0"}),
             "index.json": _json({"schemaVersion": 2, "mediaType": INDEX,
                                  "manifests": [manifest]})}
    for digest, data in blobs.items():
        files["blobs/sha256/" + digest.removeprefix("sha256:")] = data
    return files


def _dir_info(path: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type = tarfile.DIRTYPE
    return _normalize(info)


def write_archive(files: dict[str, bytes], out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for folder in ("blobs", "blobs/sha256"):
            tar.addfile(_dir_info(folder))
        for path in sorted(files):
            info = tarfile.TarInfo(path)
            info.size = len(files[path])
            tar.addfile(_normalize(info), io.BytesIO(files[path]))
    tmp.replace(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rootfs", type=Path, required=True, help="the layer's tree")
    parser.add_argument("--name", required=True, help="image reference, e.g. repo/name:tag")
    parser.add_argument("--out", type=Path, required=True, help="the archive to write")
    parser.add_argument("--entrypoint", type=json.loads, help='JSON list, e.g. ["/pause"]')
    parser.add_argument("--cmd", type=json.loads, help='JSON list, e.g. ["sh"]')
    parser.add_argument("--user", help="e.g. 65535:65535")
    parser.add_argument("--env", action="append", default=[], help="K=V (default: PATH)")
    args = parser.parse_args(argv)
    if not args.rootfs.is_dir():
        parser.error(f"--rootfs {args.rootfs}: not a folder")
    for flag in ("entrypoint", "cmd"):
        value = getattr(args, flag)
        if value is not None and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)):
            parser.error(f"--{flag}: a JSON list of strings, got {value!r}")
    files = image_files(args.rootfs, args.name, args.entrypoint, args.cmd, args.user, args.env)
    write_archive(files, args.out)


if __name__ == "__main__":
    main()
