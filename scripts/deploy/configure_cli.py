#!/usr/bin/env python3
"""fedtextseg deployment: point the operator's ``flwr`` CLI at the federation's SuperLink.

Writes (or replaces) the ``[superlink.NAME]`` connection in ``$FLWR_HOME/config.toml`` (FLWR_HOME defaults to
``~/.flwr``) with the SuperLink's ``address`` and the federation CA as ``root-certificates`` (TLS), keeping every
other entry (such as ``[superlink.local]`` for simulations). After it, ``flwr supernode register KEY NAME``,
``flwr supernode ls NAME`` and ``flwr run . NAME --stream --run-config '...'`` talk to that SuperLink.

    python scripts/deploy/configure_cli.py fedtextseg fl.hospital-net.org:9092 --ca ~/fedtextseg-certs/ca.crt
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: no validation
    tomllib = None


def connection_block(name: str, address: str, ca: Path) -> str:
    return f'[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{ca}"\n'


def write_connection(config: Path, name: str, address: str, ca: Path, make_default: bool = False) -> str:
    """Put the connection into ``config`` (replacing an earlier one of that name); return the new text.

    A new file gets ``[superlink] default = NAME``; an existing default is changed only with ``make_default``."""
    text = config.read_text() if config.exists() else ""
    out, table, has_root = [], None, False
    for line in text.splitlines():
        m = re.match(r"^\s*\[([^\[\]]+)\]\s*(#.*)?$", line)
        if m:
            table = m.group(1).strip()
            has_root = has_root or table == "superlink"
        if table is not None and (table == f"superlink.{name}" or table.startswith(f"superlink.{name}.")):
            continue  # drop the earlier connection of that name
        if make_default and table == "superlink" and re.match(r"^\s*default\s*=", line):
            line = f'default = "{name}"'
        out.append(line)
    if not has_root:
        out = ["[superlink]", f'default = "{name}"', ""] + out
    elif make_default and not any(re.match(r"^\s*default\s*=", ln) for ln in out):
        i = next(i for i, ln in enumerate(out) if re.match(r"^\s*\[superlink\]", ln))
        out.insert(i + 1, f'default = "{name}"')
    text = "\n".join(out).rstrip() + "\n\n" + connection_block(name, address, ca)
    if tomllib is not None:  # never leave a file the CLI cannot read
        parsed = tomllib.loads(text)
        assert parsed["superlink"][name]["address"] == address
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="connection name, used as `flwr run . NAME` (letters, digits, '-', '_')")
    p.add_argument("address", help="the SuperLink as HOST:PORT, HOST as its certificate names it")
    p.add_argument("--ca", required=True, help="the federation's CA certificate (ca.crt from make_certs.sh)")
    p.add_argument("--default", action="store_true", help="also make it the CLI's default SuperLink")
    args = p.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.name):
        p.error(f"bad connection name {args.name!r}")
    if not re.fullmatch(r"[^\s\"']+:\d+", args.address):
        p.error(f"address must be HOST:PORT, got {args.address!r}")
    ca = Path(args.ca).expanduser().resolve()
    if not ca.is_file():
        p.error(f"{ca} does not exist")
    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")).expanduser()
    config = home / "config.toml"
    write_connection(config, args.name, args.address, ca, args.default)
    print(f"{config}: [superlink.{args.name}] address = {args.address}, root-certificates = {ca}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
