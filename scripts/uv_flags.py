"""Print the flags that make `uv pip install` read the package sources pip is configured with here
(find-links, extra indexes, constraints from `pip config list` and PIP_* variables): the Makefile
installs with uv when it can (a minute faster than pip on a fresh venv) and falls back to pip."""
import os
import shlex
import subprocess
import sys

FLAGS = {"find-links": "--find-links", "extra-index-url": "--extra-index-url", "index-url": "--index-url",
         "constraint": "--constraint"}


def main() -> None:
    found: dict[str, list[str]] = {}
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in FLAGS:
            found.setdefault(name, []).extend(value.strip().strip("'\"").split())
    for name in FLAGS:  # the environment wins, as with pip
        env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
        if env:
            found[name] = env.split()
    args = []
    for name, values in found.items():
        for value in dict.fromkeys(values):
            if name == "constraint" and not os.path.exists(value):
                continue
            args += [FLAGS[name], value]
    print(shlex.join(args + ["--index-strategy", "unsafe-best-match"]))


if __name__ == "__main__":
    main()
