//! Architecture invariants from ARCHITECTURE.md, checked on the source tree.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && p.file_name().is_some_and(|n| n != "target") {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Workspace crates a manifest depends on (`vlmatch-*` names and path deps).
fn workspace_deps(manifest: &str) -> Vec<String> {
    let table: toml::Table = manifest.parse().unwrap();
    let mut out = Vec::new();
    for section in ["dependencies", "dev-dependencies"] {
        if let Some(deps) = table.get(section).and_then(|d| d.as_table()) {
            for (name, spec) in deps {
                let package = spec.get("package").and_then(|p| p.as_str()).unwrap_or(name);
                if package.starts_with("vlmatch") || spec.get("path").is_some() {
                    out.push(package.to_string());
                }
            }
        }
    }
    out
}

#[test]
fn core_depends_on_no_plugin_config_or_loader() {
    let manifest = read(&root().join("core/Cargo.toml"));
    assert!(
        workspace_deps(&manifest).is_empty(),
        "core depends on {:?}",
        workspace_deps(&manifest)
    );
    for dep in ["figment", "libloading", "inventory", "toml"] {
        assert!(!manifest.contains(dep), "core must not depend on {dep}");
    }
}

#[test]
fn builtin_plugins_depend_only_on_core_registry_and_layers() {
    let allowed = ["vlmatch-core", "vlmatch-registry", "vlmatch-layers"];
    for e in std::fs::read_dir(root().join("plugins")).unwrap() {
        let dir = e.unwrap().path();
        let manifest = dir.join("Cargo.toml");
        if !manifest.is_file() {
            continue; // plugins/examples holds third-party examples
        }
        for dep in workspace_deps(&read(&manifest)) {
            assert!(
                allowed.contains(&dep.as_str()),
                "{} depends on {dep}",
                dir.display()
            );
        }
    }
}

#[test]
fn only_the_registry_collects_inventory_entries() {
    let mut files = Vec::new();
    for dir in ["core", "registry", "plugins", "src", "xtask"] {
        rust_files(&root().join(dir), &mut files);
    }
    let collectors: Vec<&PathBuf> = files
        .iter()
        .filter(|f| read(f).contains("inventory::collect!"))
        .collect();
    assert_eq!(collectors, [&root().join("registry/src/registration.rs")]);
}

#[test]
fn xtask_has_no_dependencies() {
    let table: toml::Table = read(&root().join("xtask/Cargo.toml")).parse().unwrap();
    let deps = table
        .get("dependencies")
        .and_then(|d| d.as_table())
        .map(|t| t.len())
        .unwrap_or(0);
    assert_eq!(deps, 0, "xtask must build in seconds without libtorch");
}

#[test]
fn only_the_registry_loads_libraries() {
    let mut manifests = vec![
        root().join("Cargo.toml"),
        root().join("core/Cargo.toml"),
        root().join("xtask/Cargo.toml"),
    ];
    for e in std::fs::read_dir(root().join("plugins")).unwrap() {
        manifests.push(e.unwrap().path().join("Cargo.toml"));
    }
    for m in manifests.iter().filter(|m| m.is_file()) {
        assert!(
            !read(m).contains("libloading"),
            "{} depends on libloading",
            m.display()
        );
    }
    assert!(read(&root().join("registry/Cargo.toml")).contains("libloading"));
}

/// The positive relation has one definition (`core/src/positives.rs`):
/// nothing else compares image ids pairwise to decide who is a negative.
#[test]
fn only_core_positives_defines_which_pairs_are_positives() {
    let mut files = Vec::new();
    for dir in ["core", "registry", "plugins", "src"] {
        rust_files(&root().join(dir), &mut files);
    }
    let own = root().join("core/src/positives.rs");
    for f in files.iter().filter(|f| **f != own) {
        let text = read(f).replace(char::is_whitespace, "");
        for pattern in [
            "image_ids.unsqueeze(",
            "image_ids.eq_tensor(",
            "image_ids.eq(",
        ] {
            assert!(
                !text.contains(pattern),
                "{} compares image ids ({pattern}); use Batch::positives or PairKeys::relation",
                f.display()
            );
        }
    }
}

/// Weights change only in the one guarded step (`src/step.rs`):
/// `AdamW::step_masked` with the guard's verdict, never a plain `step`, and
/// the hooks after the step (momentum distillation's EMA) take the same
/// verdict. No other file of the workspace calls an optimizer's step.
#[test]
fn only_the_step_module_steps_the_optimizer() {
    let text = read(&root().join("src/step.rs")).replace(char::is_whitespace, "");
    assert!(
        !text.contains("optim.step("),
        "src/step.rs calls AdamW::step; use step_masked with the guard's verdict"
    );
    assert!(text.contains("guard.decide(") && text.contains("optim.step_masked(at.lr,&applied)"));
    assert!(
        text.contains("hooks.after_optimizer_step(&applied)"),
        "src/step.rs: the hooks after the step must take the guard's verdict"
    );
    let mut files = Vec::new();
    for dir in ["src", "core", "registry", "plugins", "dist", "xtask"] {
        rust_files(&root().join(dir), &mut files);
    }
    let callers: Vec<String> = files
        .iter()
        .filter(|f| !f.ends_with("src/step.rs") && !f.ends_with("src/optim.rs"))
        .filter(|f| {
            let code = read(f).replace(char::is_whitespace, "");
            [
                ".step_masked(",
                "optim.step(",
                "optimizer.step(",
                "opt.step(",
            ]
            .iter()
            .any(|p| code.contains(p))
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        callers.is_empty(),
        "only src/step.rs may step the optimizer (through the guard); also: {callers:?}"
    );
}

/// The training loop names no training feature: each is a hook
/// (`src/hooks/`, `src/momentum.rs`), and the loop function fits a screen.
#[test]
fn the_training_loop_names_no_feature() {
    let text = read(&root().join("src/train.rs"));
    for word in ["momentum", "tensorboard", "fault", "progress"] {
        assert!(
            !text.to_lowercase().contains(word),
            "src/train.rs mentions `{word}`: make it a hook"
        );
    }
    let start = text
        .find("pub(crate) fn run(")
        .expect("the loop function `run` in src/train.rs");
    let body = &text[start..];
    let end = body.find("\n}\n").expect("the end of `run`");
    let lines = body[..end].lines().count() + 1;
    assert!(
        lines <= 150,
        "the training loop has {lines} lines, over 150"
    );
}

/// Plugins read device tensors back to the host only through
/// `vlmatch_core::readback`, which counts the reads (`vlmatch bench`
/// prints them per step): each one synchronises a GPU.
#[test]
fn plugins_read_back_only_through_the_counted_helper() {
    let mut files = Vec::new();
    rust_files(&root().join("plugins"), &mut files);
    for f in files
        .iter()
        .filter(|f| f.components().any(|c| c.as_os_str() == "src"))
    {
        let text = read(f);
        // Unit tests may read freely.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let code = code.replace(char::is_whitespace, "");
        for pattern in [
            "to_device(Device::Cpu)",
            ".double_value(",
            ".int64_value(",
            "Vec::try_from(",
            "::try_from(&",
            "bool::try_from(",
        ] {
            assert!(
                !code.contains(pattern),
                "{} reads a tensor back with `{pattern}`; use vlmatch_core::readback::to_vec",
                f.display()
            );
        }
    }
}

/// The built-in plugin crates the root package depends on, as Rust names
/// (`cross_attention`), from its `Cargo.toml`.
fn plugin_crates() -> Vec<String> {
    let table: toml::Table = read(&root().join("Cargo.toml")).parse().unwrap();
    let deps = table["dependencies"].as_table().unwrap();
    deps.iter()
        .filter(|(_, spec)| {
            spec.get("path")
                .and_then(|p| p.as_str())
                .is_some_and(|p| p.starts_with("plugins/"))
        })
        .map(|(name, _)| name.replace('-', "_"))
        .collect()
}

/// Where `line` names an item of crate `krate` (`bert::Bert`, `use
/// neggen::{..}`), not a module of the same name under another path
/// (`crate::commands::neggen::`).
fn names_crate(line: &str, krate: &str) -> bool {
    let path = format!("{krate}::");
    let mut from = 0;
    while let Some(i) = line[from..].find(&path) {
        let at = from + i;
        let before = line[..at].chars().next_back();
        if !before.is_some_and(|c| c == ':' || c == '_' || c.is_alphanumeric()) {
            return true;
        }
        from = at + path.len();
    }
    let trimmed = line.trim_start();
    trimmed.starts_with(&format!("use {krate};"))
        || trimmed.starts_with(&format!("use {krate} as "))
        || trimmed.starts_with(&format!("extern crate {krate}"))
}

/// The host names plugins only through the registry, by name and trait
/// (ARCHITECTURE.md): no source under `src/` uses a type or function of a
/// built-in plugin crate. `src/lib.rs` only links them (`use bert as _;`).
/// Checkpoint loading (`pretrained.rs`) and export (`export.rs`) go
/// through the layouts the plugins register.
#[test]
fn the_host_imports_no_concrete_plugin() {
    let crates = plugin_crates();
    assert!(
        crates.contains(&"bert".to_string()) && crates.contains(&"neggen".to_string()),
        "{crates:?}"
    );
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    assert!(files.contains(&root().join("src/pretrained.rs")));
    assert!(files.contains(&root().join("src/export.rs")));
    let mut found = Vec::new();
    for f in &files {
        let is_lib = *f == root().join("src/lib.rs");
        for (n, line) in read(f).lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for krate in &crates {
                let link_only = is_lib && line.trim() == format!("use {krate} as _;");
                if names_crate(line, krate) && !link_only {
                    found.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "the host uses plugin crates directly (go through the registry):\n{}",
        found.join("\n")
    );
    // The check itself: it sees a use and ignores a same-named module.
    assert!(names_crate("    let s = bert::BertSection {", "bert"));
    assert!(names_crate("use neggen::NegGen;", "neggen"));
    assert!(!names_crate("crate::commands::neggen::run(", "neggen"));
    assert!(!names_crate("my_bert::x", "bert"));
}

/// The longest a source file may be: past it, a file holds several things
/// that want modules of their own (ARCHITECTURE.md).
const MAX_LINES: usize = 800;

/// Whether `path` (under the repository) is test code: under a `tests/` or
/// `benches/` directory.
fn is_test_file(path: &Path) -> bool {
    let rel = path.strip_prefix(root()).unwrap_or(path);
    rel.components()
        .any(|c| c.as_os_str() == "tests" || c.as_os_str() == "benches")
}

/// `path: N lines` for each of `files` (path, text) over `max` lines.
fn too_long(files: &[(String, String)], max: usize) -> Vec<String> {
    files
        .iter()
        .filter(|(_, text)| text.lines().count() > max)
        .map(|(path, text)| format!("{path}: {} lines", text.lines().count()))
        .collect()
}

/// The languages the line limit covers.
const SOURCE_EXTENSIONS: [&str; 4] = ["rs", "cpp", "h", "py"];

/// Folders the line limit does not look into: hidden ones (`.git`, the
/// provisioned `.vlmatch`), build output and other git-ignored folders, and
/// fixtures (generated data).
fn skipped_dir(name: &str) -> bool {
    name.starts_with('.')
        || ["target", "runs", "gpu-bundle", "fixtures", "__pycache__"].contains(&name)
}

/// Every file of the covered languages under `dir`, outside skipped folders.
fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        if p.is_dir() {
            if !skipped_dir(&name) {
                source_files(&p, out);
            }
        } else if p
            .extension()
            .is_some_and(|x| SOURCE_EXTENSIONS.iter().any(|e| x == *e))
        {
            out.push(p);
        }
    }
}

#[test]
fn no_source_file_passes_800_lines() {
    let mut files = Vec::new();
    source_files(&root(), &mut files);
    let sources: Vec<(String, String)> = files
        .iter()
        .filter(|f| !is_test_file(f))
        .map(|f| (f.display().to_string(), read(f)))
        .collect();
    assert!(sources.len() > 50, "found {} source files", sources.len());
    let long = too_long(&sources, MAX_LINES);
    assert!(
        long.is_empty(),
        "source files over {MAX_LINES} lines (split them into modules):\n{}",
        long.join("\n")
    );
    // The check itself: it counts lines, and test code is exempt.
    let lines = |n: usize| "x\n".repeat(n);
    let synthetic = [
        ("ok.rs".to_string(), lines(MAX_LINES)),
        ("long.rs".to_string(), lines(MAX_LINES + 1)),
    ];
    assert_eq!(too_long(&synthetic, MAX_LINES), ["long.rs: 801 lines"]);
    assert!(is_test_file(&root().join("tests/tidy.rs")));
    assert!(is_test_file(&root().join("plugins/itc/tests/x.rs")));
    assert!(!is_test_file(&root().join("src/cli.rs")));
    // It sees every covered language, and skips what is not source.
    for ext in SOURCE_EXTENSIONS {
        assert!(
            files
                .iter()
                .any(|f| f.extension().is_some_and(|x| x == ext)),
            "found no .{ext} file"
        );
    }
    for dir in [".vlmatch", ".git", "target", "fixtures", "gpu-bundle"] {
        assert!(skipped_dir(dir), "{dir}");
    }
    assert!(!skipped_dir("bench") && !skipped_dir("dist"));
}

/// The module of the root crate that `path` (under `src/`) defines:
/// `src/lib.rs` the crate root (""), `src/a/mod.rs` and `src/a.rs` `a`,
/// `src/a/b.rs` `a::b`; `None` for the binary's `src/main.rs`.
fn module_of(path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root().join("src")).ok()?;
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let file = parts.pop()?;
    match file.as_str() {
        "main.rs" if parts.is_empty() => return None,
        "lib.rs" if parts.is_empty() => {}
        "mod.rs" => {}
        other => parts.push(other.strip_suffix(".rs")?.to_string()),
    }
    Some(parts.join("::"))
}

/// The `crate::` paths `text` names (`use crate::a::b;`, `crate::a::f()`,
/// `use crate::{a, b::{c, d}}` as `a`, `b::c`, `b::d`), comment lines
/// apart; `$crate::` in macros is not one.
fn crate_paths(text: &str) -> Vec<Vec<String>> {
    fn ident(s: &str) -> (&str, &str) {
        let end = s
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        s.split_at(end)
    }
    /// A path after `crate::` (or after a group's opening brace): its
    /// segments, with a `{..}` group expanded; returns what follows.
    fn path<'a>(mut s: &'a str, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> &'a str {
        let mut segs = prefix;
        loop {
            s = s.trim_start();
            if let Some(rest) = s.strip_prefix('{') {
                s = rest;
                loop {
                    s = path(s, segs.clone(), out).trim_start();
                    if let Some(rest) = s.strip_prefix(',') {
                        s = rest;
                        if let Some(rest) = s.trim_start().strip_prefix('}') {
                            return rest;
                        }
                    } else {
                        return s.strip_prefix('}').unwrap_or(s);
                    }
                }
            }
            let (name, rest) = ident(s);
            if name.is_empty() {
                break;
            }
            segs.push(name.to_string());
            s = rest;
            match s.strip_prefix("::") {
                Some(rest) => s = rest,
                None => break,
            }
        }
        if !segs.is_empty() {
            out.push(segs);
        }
        s
    }
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = code[from..].find("crate::") {
        let at = from + i;
        let before = code[..at].chars().next_back();
        from = at + "crate::".len();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        path(&code[from..], Vec::new(), &mut out);
    }
    out
}

/// `(importer, imported)` for `(module, text)` per file: an import is a
/// `crate::` path whose longest prefix that is a module is another module.
fn import_edges(files: &[(String, String)]) -> std::collections::BTreeSet<(String, String)> {
    let modules: std::collections::BTreeSet<&str> = files.iter().map(|(m, _)| m.as_str()).collect();
    let mut edges = std::collections::BTreeSet::new();
    for (module, text) in files {
        for p in crate_paths(text) {
            let target = (1..=p.len())
                .rev()
                .map(|n| p[..n].join("::"))
                .find(|m| modules.contains(m.as_str()));
            if let Some(t) = target.filter(|t| t != module) {
                edges.insert((module.clone(), t));
            }
        }
    }
    edges
}

/// Pairs of modules that import each other ([`import_edges`]).
fn import_cycles(files: &[(String, String)]) -> Vec<(String, String)> {
    let edges = import_edges(files);
    edges
        .iter()
        .filter(|(a, b)| a < b && edges.contains(&(b.clone(), a.clone())))
        .cloned()
        .collect()
}

/// No two modules of the root crate import each other: a module that
/// needs something from the one that uses it holds what should be a third
/// module (as `run.rs`, shared by the commands, `bench` and `vqa`).
#[test]
fn no_two_host_modules_import_each_other() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let modules: Vec<(String, String)> = files
        .iter()
        .filter_map(|f| Some((module_of(f)?, read(f))))
        .collect();
    assert!(modules.iter().any(|(m, _)| m == "commands::eval"));
    // It sees the real imports: `cli` dispatches to the commands, which load
    // runs through `run`.
    let edges = import_edges(&modules);
    for (a, b) in [
        ("cli", "commands::neggen"),
        ("commands::neggen", "run"),
        ("downstream::vqa", "run"),
    ] {
        assert!(edges.contains(&(a.into(), b.into())), "no edge {a} -> {b}");
    }
    let cycles = import_cycles(&modules);
    assert!(
        cycles.is_empty(),
        "modules that import each other (move what both need into a third):\n{}",
        cycles
            .iter()
            .map(|(a, b)| format!("{a} <-> {b}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The check itself, on a synthetic crate.
    let m = |name: &str, text: &str| (name.to_string(), text.to_string());
    let synthetic = [
        m("a", "use crate::b::X;\n// crate::c::Y in a comment\n"),
        m("b", "fn f() { crate::a::g() }"),
        m("c", "use crate::{\n    a,\n    d::{e::Z, W},\n};"),
        m("d", "use crate::c as _;"),
        m("d::e", "macro_rules! m { () => { $crate::d::x } }"),
    ];
    assert_eq!(
        import_cycles(&synthetic),
        [("a".to_string(), "b".to_string()), ("c".into(), "d".into())]
    );
    assert_eq!(
        crate_paths("use crate::{a, b::{c, d}};"),
        [vec!["a"], vec!["b", "c"], vec!["b", "d"]]
    );
    assert_eq!(module_of(&root().join("src/lib.rs")).as_deref(), Some(""));
    assert_eq!(
        module_of(&root().join("src/eval/mod.rs")).as_deref(),
        Some("eval")
    );
    assert_eq!(
        module_of(&root().join("src/commands/eval.rs")).as_deref(),
        Some("commands::eval")
    );
    assert_eq!(module_of(&root().join("src/main.rs")), None);
}

/// Every table of measured results names the command that produced it and
/// the commit it was measured at; the README stays a short introduction.
#[test]
fn results_tables_name_command_and_commit_and_readme_is_short() {
    /// 1-based lines of the tables (blocks of lines starting with `|`, outside
    /// code fences) without both a `command:` and a `commit:` line after the
    /// previous table or heading.
    fn unlabelled_tables(text: &str) -> Vec<usize> {
        let (mut command, mut commit, mut table, mut fenced) = (false, false, false, false);
        let mut bad = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.starts_with("```") {
                fenced = !fenced;
            }
            if !fenced && line.starts_with('|') {
                if !table && !(command && commit) {
                    bad.push(i + 1);
                }
                table = true;
                continue;
            }
            if table || (!fenced && line.starts_with('#')) {
                (command, commit) = (false, false);
            }
            table = false;
            command |= line.starts_with("command:");
            commit |= line.starts_with("commit:");
        }
        bad
    }
    let results = read(&root().join("docs/results.md"));
    let bad = unlabelled_tables(&results);
    assert!(
        bad.is_empty(),
        "docs/results.md: {} (write the exact command and the commit hash \
         between the previous table or heading and the table)",
        bad.iter()
            .map(|l| format!("the table at line {l} lacks a `command:` or a `commit:` line"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    // The check itself.
    let labelled = "# A\ncommand: `x`\ncommit: abc\n\n| a |\n|---|\n";
    assert!(unlabelled_tables(labelled).is_empty());
    assert_eq!(unlabelled_tables(&format!("{labelled}\n| b |\n")), [8]);
    assert_eq!(
        unlabelled_tables("command: x\n## B\ncommit: y\n| c |\n"),
        [4]
    );
    assert_eq!(
        unlabelled_tables("command: x\n```\n# y\n```\ncommit: y\n| c |\n"),
        Vec::<usize>::new()
    );

    let readme = read(&root().join("README.md")).lines().count();
    assert!(
        readme <= 200,
        "README.md has {readme} lines, over 200: move the detail to docs/"
    );
}
