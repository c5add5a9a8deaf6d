#!/usr/bin/env python3
"""physr's layer check: every module includes only headers of modules it declares.

Usage: check_layers.py GRAPH ROOT

GRAPH is the module graph CMake writes (build/<preset>/physr-modules.txt), one line per
module in layer order:

    module: public module deps | private module deps

ROOT holds src/<module>/ and include/physr/<module>.hpp. Every file of src/<module>/**
and include/physr/<module>.hpp (and include/physr/<module>/**) is scanned for
`#include "physr/X.hpp"` (or <physr/X.hpp>) and for private `#include "X/..."`, X a module.
A module M may include its own headers and those of the modules it declares, directly or
through their public dependencies; its public header only through its public ones. A
public header may not include a private one (it is not installed). Every folder under src/
and every header under include/physr/ must belong to a module.

Prints one line per violation, FILE:LINE: what, and exits 1; exits 0 when there is none.
"""

import os
import re
import sys

SOURCE_EXTENSIONS = (".cpp", ".cc", ".cxx", ".c", ".hpp", ".hh", ".hxx", ".h", ".ipp", ".inc")
INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]')
PUBLIC = re.compile(r"^physr/([A-Za-z0-9_]+)(\.hpp|/.+)$")


def parse_graph(path):
    """[(module, public deps, private deps)] in file order, and the graph's own errors."""
    modules, errors = [], []
    seen = set()
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            m = re.fullmatch(r"([A-Za-z0-9_]+):([^|]*)\|?(.*)", line)
            if not m:
                errors.append(f"{path}:{n}: not 'module: deps | private deps': {raw.rstrip()}")
                continue
            name, public, private = m.group(1), m.group(2).split(), m.group(3).split()
            for dep in public + private:
                if dep not in seen:
                    errors.append(f"{path}:{n}: module {name} depends on {dep}, which is not a module above it")
            seen.add(name)
            modules.append((name, public, private))
    return modules, errors


def closures(modules):
    """For each module: what its sources may include, and what its public header may."""
    public_closure = {}
    for name, public, _ in modules:  # layer order: every dependency is already done
        c = {name}
        for dep in public:
            c |= public_closure.get(dep, {dep})
        public_closure[name] = c
    sources, header = {}, {}
    for name, public, private in modules:
        header[name] = set(public_closure[name])
        s = set(public_closure[name])
        for dep in private:
            s |= public_closure.get(dep, {dep})
        sources[name] = s
    return sources, header


def files_under(folder):
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for f in sorted(filenames):
            yield os.path.join(dirpath, f)


def owner_of(rel):
    """(module, private) of a file path relative to ROOT; (None, True) for a file directly in
    src/; (None, False) for a file outside src/ and include/physr/."""
    parts = os.path.normpath(rel).split(os.sep)
    if parts[0] == "src" and len(parts) > 2:
        return parts[1], True
    if parts[0] == "src" and len(parts) == 2:
        return None, True
    if parts[:2] == ["include", "physr"] and len(parts) == 3 and parts[2].endswith(".hpp"):
        return parts[2][: -len(".hpp")], False
    if parts[:2] == ["include", "physr"] and len(parts) > 3:
        return parts[2], False
    return None, False


def module_files(root, names, errors):
    """(path relative to root, module, is public header) for every file to scan."""
    out = []
    src = os.path.join(root, "src")
    if os.path.isdir(src):
        for entry in sorted(os.listdir(src)):
            path = os.path.join(src, entry)
            if os.path.isdir(path):
                if entry not in names:
                    errors.append(f"src/{entry}/: a folder of no module (declare it with physr_add_module)")
                    continue
                out += [(os.path.relpath(f, root), entry, False) for f in files_under(path) if f.endswith(SOURCE_EXTENSIONS)]
            elif entry.endswith(SOURCE_EXTENSIONS):
                errors.append(f"src/{entry}: belongs to no module (move it into the folder of the module it serves)")
    inc = os.path.join(root, "include", "physr")
    if os.path.isdir(inc):
        for f in files_under(inc):
            rel = os.path.relpath(f, root)
            owner, _ = owner_of(rel)
            if owner not in names:
                errors.append(f"{rel}: a public header of no module (include/physr/<module>.hpp)")
                continue
            out.append((rel, owner, True))
    return out


def resolve(root, rel, quote, target):
    """(module, private, path) an #include in file `rel` reaches; module None when it is not
    physr's (a system or third-party header), path None for physr/X where X has no header."""
    m = PUBLIC.match(target)
    candidates = [os.path.join(os.path.dirname(rel), target)] if quote == '"' else []
    candidates += [os.path.join("src", target), os.path.join("include", target)] if quote == '"' or m else []
    for c in candidates:
        if os.path.isfile(os.path.join(root, c)):
            owner, private = owner_of(c)
            if owner is not None or private:
                return owner, private, os.path.normpath(c)
    if m:
        return m.group(1), False, None
    return None, False, None


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    graph, root = argv[1], argv[2]
    modules, errors = parse_graph(graph)
    names = [m[0] for m in modules]
    sources_may, header_may = closures(modules)
    scanned = module_files(root, set(names), errors)
    for rel, module, public_header in scanned:
        allowed = header_may[module] if public_header else sources_may[module]
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                inc = INCLUDE.match(line)
                if not inc:
                    continue
                quote, target = inc.group(1), inc.group(2)
                reached, private, path = resolve(root, rel, quote, target)
                where = f"{rel}:{n}: module {module}"
                if reached is None and private:
                    errors.append(f"{where} includes {target} ({path}), which belongs to no module")
                    continue
                if reached is None:
                    continue
                if reached not in names:
                    errors.append(f"{where} includes {target}: there is no module {reached}")
                    continue
                if public_header and private:
                    errors.append(f"{where}: its public header includes {target}, a private header ({path}) that is not installed")
                    continue
                if reached not in allowed and public_header and reached in sources_may[module]:
                    errors.append(f"{where} includes {target} in its public header, but {reached} is a private "
                                  f"dependency of {module} (move it to DEPS in src/CMakeLists.txt, or the include to a source)")
                elif reached not in allowed:
                    deps = " ".join(sorted(allowed - {module}, key=lambda d: names.index(d) if d in names else len(names))) or "none"
                    errors.append(f"{where} includes {target}, a header of module {reached}, which {module} does not "
                                  f"depend on (it may use: {deps}); see src/CMakeLists.txt")
    for e in errors:
        print(e)
    if errors:
        print(f"layers: {len(errors)} violation(s) in {len(scanned)} files of {len(names)} modules")
        return 1
    print(f"layers: {len(scanned)} files of {len(names)} modules include only the modules they declare")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
