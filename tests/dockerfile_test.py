#!/usr/bin/python3
"""Checks deploy/Dockerfile without Docker, against what this machine really has.

- dockerfile-utils (deploy/validate, the VS Code Docker extension's linter) reports nothing;
  hadolint too where it is installed (it is not in Debian: skipped when absent);
- a build stage FROM debian:<this machine's release> and a runtime stage FROM its -slim;
  COPY --from names an earlier stage; the runtime stage runs as a non-root user it creates;
- every Debian package the stages install (the build stage's scripts/install_deps.sh list
  included) exists in this release's archive (apt-cache policy), the runtime stage installs
  no -dev package; NVIDIA's packages (installed after cuda-keyring) carry the toolkit version
  the CUDA_PATH names, which is the nvcc of this machine where there is one, and give nvcc,
  static cudart, CUB and cuBLASLt that tools/cuda_configure.bzl links;
- the targets it builds are the binaries given to this test (so they exist), the files it
  copies are those targets, and every binary the manifests run (/app/...) is copied;
- every shared library the binaries built here load (ldd) is in the runtime stage: a Debian
  package that the runtime packages pull in (apt-cache depends --recurse) or, for CUDA's
  libraries, a file the build stage copies beside the binaries;
- .dockerignore keeps Git, Bazel's output symlinks and node_modules out of the context, and
  deploy/k8s/README.md's docker build tags the image the manifests name.
Needs apt's package lists and node with deploy/validate/node_modules (scripts/test.sh).
"""
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import yaml

ROOT = os.environ.get("TEST_SRCDIR", "")
if ROOT:
    ROOT = os.path.join(ROOT, os.environ.get("TEST_WORKSPACE", "sparseaccel"))
else:
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(ROOT, "deploy", "Dockerfile")
NVIDIA_PREFIXES = ("cuda-", "libcublas", "libcudnn", "libnccl", "libcusparse", "libcufft",
                   "libcurand", "libcusolver", "libnvjitlink", "nvidia-")

failures = []


def check(condition, message):
    if not condition:
        failures.append(message)
    return condition


def read(*parts):
    return open(os.path.join(ROOT, *parts)).read()


def instructions(text):
    """(keyword, arguments, line) per instruction: continuations joined, comments dropped."""
    result, pending, start = [], "", 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # A comment inside a continued instruction.
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        keyword, _, arguments = pending.partition(" ")
        result.append((keyword.upper(), arguments.strip(), start))
        pending = ""
    check(not pending, "Dockerfile ends inside a continued line")
    return result


def expand(text, variables):
    return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                  lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def shell_commands(run):
    """The simple commands of a RUN line (split at &&, ||, ;)."""
    return [shlex.split(c) for c in re.split(r"&&|\|\||;", run) if c.strip()]


def install_deps_packages():
    text = read("scripts", "install_deps.sh")
    block = re.search(r"^packages=\((.*?)^\)", text, re.M | re.S)
    return block.group(1).split() if block else []


class Stage:
    def __init__(self, image, name, line):
        self.image, self.name, self.line = image, name, line
        self.variables = {}
        self.debian, self.nvidia = [], []  # Packages installed, by source.
        self.runs, self.copies = [], []
        self.user = None
        self.keyring = None


def parse_stages():
    stages, global_args = [], {}
    for keyword, arguments, line in instructions(read("deploy", "Dockerfile")):
        if keyword == "FROM":
            words = arguments.split()
            if words and words[0].startswith("--platform"):
                words = words[1:]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(expand(words[0], global_args), name, line))
            continue
        if not stages:
            if keyword == "ARG":
                key, _, value = arguments.partition("=")
                global_args[key] = value
            continue
        stage = stages[-1]
        if keyword in ("ARG", "ENV"):
            for item in shlex.split(arguments):
                key, _, value = item.partition("=")
                if value or key not in stage.variables:
                    stage.variables[key] = expand(value, stage.variables)
        elif keyword == "RUN":
            run = expand(arguments, stage.variables)
            stage.runs.append(run)
            for command in shell_commands(run):
                if command[:1] == ["dpkg"] and any("cuda-keyring" in w for w in command):
                    stage.keyring = True
                if command and command[0].endswith("install_deps.sh"):
                    stage.debian += install_deps_packages()
                if command[:2] in (["apt-get", "install"], ["apt", "install"]):
                    packages = [w for w in command[2:] if not w.startswith("-")]
                    (stage.nvidia if stage.keyring else stage.debian).extend(packages)
            for url in re.findall(r"https://\S+cuda-keyring\S*", run):
                stage.keyring = url
        elif keyword == "COPY":
            stage.copies.append(expand(arguments, stage.variables).split())
        elif keyword == "USER":
            stage.user = expand(arguments, stage.variables)
    return stages


def apt_policy(packages):
    """package -> (candidate version, True if a bookworm-style release offers it)."""
    out = subprocess.run(["apt-cache", "policy"] + sorted(set(packages)), capture_output=True,
                         text=True).stdout
    result, current = {}, None
    for line in out.splitlines():
        m = re.match(r"^(\S+):$", line)
        if m:
            current = m.group(1)
            result[current] = [None, []]
        elif current and line.strip().startswith("Candidate:"):
            result[current][0] = line.split(":", 1)[1].strip()
        elif current and re.match(r"^\s+\d+ \S+://", line):
            result[current][1].append(line.split()[2])
    return result


def depends_closure(packages):
    out = subprocess.run(
        ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
         "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances"] + packages,
        capture_output=True, text=True).stdout
    closure = set(packages)
    for line in out.splitlines():
        m = re.match(r"^\s*(?:\|)?(?:Depends|PreDepends): <?([^\s<>]+)>?", line)
        if m:
            closure.add(m.group(1))
        elif re.match(r"^[^\s<]\S*$", line):
            closure.add(line.strip())
    return closure


def lint(release):
    script = os.path.realpath(os.path.join(ROOT, "deploy", "validate", "lint_dockerfile.js"))
    result = subprocess.run(["node", script, DOCKERFILE], capture_output=True, text=True)
    print(result.stdout + result.stderr, end="")
    check(result.returncode == 0, "dockerfile-utils: exit %d" % result.returncode)
    hadolint = shutil.which("hadolint")
    if hadolint:
        result = subprocess.run([hadolint, DOCKERFILE], capture_output=True, text=True)
        print(result.stdout + result.stderr, end="")
        check(result.returncode == 0, "hadolint: exit %d" % result.returncode)
    else:
        print("hadolint: not installed (not in Debian %s); skipped" % release)


def main():
    release = dict(line.strip().split("=", 1) for line in open("/etc/os-release")
                   if "=" in line).get("VERSION_CODENAME", "").strip('"')
    lint(release)
    stages = parse_stages()
    if not check(len(stages) >= 2, "expected a build and a runtime stage, got %d" % len(stages)):
        return report()
    build, runtime = stages[0], stages[-1]
    check(build.image == "debian:%s" % release,
          "build stage is FROM %s, not debian:%s (this machine's archive)" % (build.image, release))
    check(runtime.image == "debian:%s-slim" % release,
          "runtime stage is FROM %s, not debian:%s-slim" % (runtime.image, release))
    names = [s.name for s in stages]
    for index, stage in enumerate(stages):
        for copy in stage.copies:
            for flag in copy:
                if flag.startswith("--from="):
                    check(flag[7:] in names[:index], "COPY %s: no earlier stage %s" %
                          (" ".join(copy), flag[7:]))
            if not any(w.startswith("--from=") for w in copy):
                for source in copy[:-1]:
                    if not source.startswith("--"):
                        check(os.path.exists(os.path.join(ROOT, source)) or source == ".",
                              "COPY %s: no such file in the repository" % source)
    user = (runtime.user or "root").split(":")[0]
    check(user not in ("root", "0"), "runtime stage runs as root")
    check(any(re.search(r"useradd\b.*(--uid %s\b|\b%s$)" % (user, user), r) for r in runtime.runs),
          "runtime stage does not create user %s" % user)

    # Debian packages: in this release's archive; none of -dev in the runtime stage.
    debian = sorted(set(p for s in stages for p in s.debian))
    policy = apt_policy(debian + ["bash"])
    if not check(policy.get("bash", [None])[0] not in (None, "(none)"),
                 "apt-cache knows no packages: apt's lists are missing (apt-get update)"):
        return report()
    for package in debian:
        candidate, releases = policy.get(package, [None, []])
        if check(candidate not in (None, "(none)"), "%s: not in the Debian archive" % package):
            check(any(r.split("/")[0].startswith(release) for r in releases),
                  "%s: not from %s (%s)" % (package, release, releases))
    for package in runtime.debian:
        check(not package.endswith("-dev"), "runtime stage installs %s" % package)
    print("Debian packages: %d in the archive of %s (build %d, runtime %d)" % (
        len(debian), release, len(set(build.debian)), len(set(runtime.debian))))
    check(set(install_deps_packages()) <= set(build.debian),
          "build stage does not install scripts/install_deps.sh's packages")

    # NVIDIA's packages: one toolkit version, the one CUDA_PATH names and this machine's nvcc has.
    cuda_path = build.variables.get("CUDA_PATH", "")
    version = re.search(r"cuda-(\d+)\.(\d+)$", cuda_path)
    check(version, "build stage has no CUDA_PATH=/usr/local/cuda-X.Y")
    suffix = "-%s-%s" % version.groups() if version else "?"
    check(isinstance(build.keyring, str) and
          "/repos/debian%s/" % {"bookworm": "12", "trixie": "13"}.get(release, "?") in build.keyring,
          "cuda-keyring is not NVIDIA's repository for this Debian release: %s" % build.keyring)
    # A toolkit package names its version (cuda-nvcc-13-0); a library released beside it
    # (libnccl2) is pinned to its build for that version (=2.28.9-1+cuda13.0).
    cuda_build = "+cuda%s.%s" % version.groups() if version else "?"
    for package in build.nvidia:
        name, _, pin = package.partition("=")
        check(name.startswith(NVIDIA_PREFIXES), "%s: not an NVIDIA package" % package)
        check(name.endswith(suffix) or pin.endswith(cuda_build),
              "%s: not CUDA %s" % (package, suffix[1:]))
    # The NCCL the image ships is the release whose nccl.h this machine compiles against.
    header = os.path.join(os.environ.get("CUDA_PATH", "/usr/local/cuda"), "include", "nccl.h")
    nccl = [p.partition("=")[2] for p in build.nvidia if p.startswith("libnccl2=")]
    check(len(nccl) == 1, "build stage does not pin one libnccl2 (prefill_server --gpus)")
    if os.path.exists(header) and nccl:
        text = open(header).read()
        release = ".".join(re.search(r"#define NCCL_%s (\d+)" % part, text).group(1)
                           for part in ("MAJOR", "MINOR", "PATCH"))
        check(nccl[0].startswith(release + "-"),
              "libnccl2=%s, this machine's nccl.h is %s" % (nccl[0], release))
    configure = read("tools", "cuda_configure.bzl")
    needed = {"cuda-nvcc": True, "cuda-cudart-dev": "-lcudart_static" in configure,
              "libcublas-dev": "-lcublasLt" in configure, "cuda-cccl": True}  # cccl: CUB.
    for component, used in needed.items():
        if used:
            check(component + suffix in build.nvidia, "build stage lacks %s%s" % (component, suffix))
    nvcc = os.path.join(os.environ.get("CUDA_PATH", "/usr/local/cuda"), "bin", "nvcc")
    if os.path.exists(nvcc):
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        here = re.search(r"release (\d+)\.(\d+)", out)
        check(here and "-%s-%s" % here.groups() == suffix,
              "this machine's nvcc is %s, the image's CUDA %s" % (here and here.group(0), suffix))
        print("nvcc here: %s; image: CUDA packages %s" % (here and here.group(0), suffix[1:]))
    else:
        print("no nvcc here: the CUDA version is not compared")

    # Bazel targets built, files copied, binaries the manifests run.
    labels = [w for r in build.runs if "bazel build" in r for w in r.split() if w.startswith("//")]
    check(labels, "build stage builds no bazel targets")
    built = {}
    for label in labels:
        package, _, name = label[2:].partition(":")
        path = os.path.join(ROOT, package, name)
        if check(os.path.isfile(path) and os.access(path, os.X_OK),
                 "%s: not a binary given to this test (tests/BUILD data)" % label):
            built[name] = path
    copied = set()
    for run in build.runs:
        for command in shell_commands(run):
            if command[:1] == ["cp"]:
                for source in command[1:-1]:
                    if source.startswith("bazel-bin/"):
                        check(os.path.basename(source) in built and
                              source == "bazel-bin/%s" % os.path.relpath(
                                  built.get(os.path.basename(source), ""), ROOT),
                              "copies %s, which it does not build" % source)
                    if not source.startswith("-"):
                        copied.add(os.path.basename(source))
    check(any(c[0] == "--from=%s" % build.name and c[-1].rstrip("/") == "/app"
              for c in runtime.copies), "runtime stage does not copy the build's files to /app")
    for path in sorted(glob.glob(os.path.join(ROOT, "deploy", "k8s", "*.yaml"))):
        for doc in yaml.safe_load_all(open(path)):
            for container in ((doc or {}).get("spec", {}).get("template", {}).get("spec", {})
                              .get("containers", [])):
                command = container.get("command", [""])[0]
                check(command.startswith("/app/") and command[5:] in copied,
                      "%s runs %s, which the image does not have" % (os.path.basename(path),
                                                                      command))

    # Shared libraries of the binaries built here, against the runtime stage.
    closure = depends_closure(sorted(set(runtime.debian)))
    libraries = {}
    for name, path in built.items():
        out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.match(r"^\s*(\S+) => (.*?) \(0x", line)
            if m:
                check(m.group(2) != "not found", "%s: %s not found" % (name, m.group(1)))
                libraries[m.group(1)] = m.group(2)
    # Package owners, from one dpkg -S over each path in its /lib and /usr/lib spellings
    # (merged /usr) and resolved through its symlinks (alternatives).
    variants = {}
    for soname, path in libraries.items():
        for candidate in (path, os.path.realpath(path)):
            for variant in (candidate, re.sub(r"^/usr/lib/", "/lib/", candidate),
                            re.sub(r"^/lib/", "/usr/lib/", candidate)):
                variants.setdefault(soname, []).append(variant)
    owners = {}
    out = subprocess.run(["dpkg", "-S"] + sorted({v for vs in variants.values() for v in vs}),
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        packages, _, path = line.partition(": ")
        owners[path.strip()] = packages.split(", ")[0].split(":")[0]
    for soname, path in sorted(libraries.items()):
        if "/cuda" in path:
            check(soname in copied, "%s (%s) is not copied beside the binaries" % (soname, path))
            continue
        owner = next((owners[v] for v in variants[soname] if v in owners), None)
        if check(owner, "%s (%s): no Debian package owns it" % (soname, path)):
            check(owner in closure, "%s: its package %s is not in the runtime stage" %
                  (soname, owner))
    print("shared libraries: %d, all in the runtime stage's %d packages (with dependencies)"
          % (len(libraries), len(closure)))

    # The build context and the image name.
    ignore = read(".dockerignore").split()
    for pattern in (".git", "bazel-*", "**/node_modules"):
        check(pattern in ignore, ".dockerignore lacks %s" % pattern)
    images = set()
    for path in glob.glob(os.path.join(ROOT, "deploy", "k8s", "*.yaml")):
        for doc in yaml.safe_load_all(open(path)):
            for container in ((doc or {}).get("spec", {}).get("template", {}).get("spec", {})
                              .get("containers", [])):
                images.add(container["image"])
    check(len(images) == 1, "the manifests name images %s" % images)
    readme = read("deploy", "k8s", "README.md")
    for image in images:
        check("docker build -f deploy/Dockerfile -t %s ." % image in readme,
              "deploy/k8s/README.md does not show how to build %s" % image)
    return report()


def report():
    for failure in failures:
        print("FAIL:", failure)
    print("Dockerfile checks: %d failures" % len(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
