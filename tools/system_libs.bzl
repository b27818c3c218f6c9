"""Repository rule: wrap system (Debian) libraries found by pkg-config as cc_library targets.

Headers live in /usr/include, which the auto-configured gcc toolchain already treats as a
builtin include dir, so only link flags are needed.  Each library gets a dynamic flavour
(default) and a static flavour (`--define=link=static`).
"""

def _pkg(rctx, args):
    res = rctx.execute(["pkg-config"] + args)
    if res.return_code != 0:
        fail("pkg-config %s failed: %s" % (" ".join(args), res.stderr))
    return [f for f in res.stdout.strip().split(" ") if f]

def _dedup_keep_last(flags):
    # pkg-config repeats -labsl_* many times; keep the last occurrence (link order).
    out = []
    for f in reversed(flags):
        if f not in out:
            out.append(f)
    return list(reversed(out))

def _system_libs_impl(rctx):
    lines = ['package(default_visibility = ["//visibility:public"])', ""]
    for name, spec in rctx.attr.libs.items():
        # Tokens starting with "-l" are extra libraries without a .pc file of their own.
        extra = [t for t in spec.split(" ") if t.startswith("-l")]
        pkgs = [t for t in spec.split(" ") if not t.startswith("-l")]
        cflags = [f[2:] for f in _pkg(rctx, ["--cflags"] + pkgs) if f.startswith("-D")]
        dyn = _dedup_keep_last(extra + _pkg(rctx, ["--libs"] + pkgs))
        sta = _dedup_keep_last(extra + _pkg(rctx, ["--libs", "--static"] + pkgs))
        # Static flavour: archives for -l flags, but keep glibc/system libs dynamic.
        keep_dynamic = ["-lpthread", "-lrt", "-ldl", "-lm", "-latomic", "-lsystemd"]
        sta_flags = ["-Wl,-Bstatic"]
        for f in sta:
            if f.startswith("-l") and f not in keep_dynamic:
                sta_flags.append(f)
        sta_flags.append("-Wl,-Bdynamic")
        sta_flags += [f for f in sta if f in keep_dynamic or not f.startswith("-l")]
        lines.append("cc_library(")
        lines.append("    name = %r," % name)
        lines.append("    defines = %r," % cflags)
        lines.append("    linkopts = select({")
        lines.append('        "@//tools:link_static": %r,' % sta_flags)
        lines.append('        "//conditions:default": %r,' % dyn)
        lines.append("    }),")
        lines.append(")")
        lines.append("")
    rctx.file("WORKSPACE", "workspace(name = %r)\n" % rctx.name)
    rctx.file("BUILD", "\n".join(lines))

system_libs = repository_rule(
    implementation = _system_libs_impl,
    attrs = {"libs": attr.string_dict(doc = "target name -> space separated pkg-config modules")},
    local = True,
    environ = ["PKG_CONFIG_PATH"],
)
