"""Print the config reference table (markdown) from byol3d.config.OPTIONS, or update README.md.

python scripts/config_reference.py            # print the table
python scripts/config_reference.py --write    # replace the table in README.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from byol3d.config import OPTIONS

BEGIN, END = "<!-- config-table:begin -->", "<!-- config-table:end -->"


def table() -> str:
    rows = []
    for key, opt in OPTIONS.items():
        default = json.dumps(opt.default)
        meaning = opt.help + (f" ({' / '.join(map(str, opt.choices))})" if opt.choices else "")
        rows.append(f"| `{key}` | `{default}` | {meaning} |")
    return "\n".join(["| key | default | meaning |", "|---|---|---|", *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    args = parser.parse_args()
    if not args.write:
        print(table())
        return
    readme = Path(__file__).parents[1] / "README.md"
    text = readme.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")


if __name__ == "__main__":
    main()
