//! The libtorch this process loaded is 2.11.x, checked at start-up.
//!
//! `tch = "=0.24.0"` binds libtorch 2.11 and vlmatch-dist's c10d shim
//! declares 2.11's `ProcessGroupGloo` by hand (`dist/csrc/gloo_decl.h`). The
//! build refuses other headers (`dist/csrc/version_check.h`), but the library
//! found at run time is another matter: a `pip install -U torch` in the
//! linked venv or an `LD_LIBRARY_PATH` naming another torch loads a different
//! `libtorch_cpu.so` under the same binary, which would corrupt memory rather
//! than fail. So `main` calls [`check_or_exit`] before anything else.
//!
//! How: the path of the `libtorch_cpu.so` the dynamic loader mapped comes
//! from `/proc/self/maps` (the file actually mapped, symbolic links
//! resolved), and its version from the files beside it: `torch/version.py`
//! (`__version__ = '2.11.0+cu130'`, the PyPI wheel) or `build-version`
//! (`2.11.0+cpu`, the libtorch zip), in the directory above `lib/`. One small
//! file read plus the maps; no libtorch call. When the version cannot be
//! determined (no maps, no version file) it warns and goes on.

use std::path::{Path, PathBuf};

/// The libtorch major and minor version this build needs (any patch).
pub const EXPECTED: (u32, u32) = (2, 11);

/// [`EXPECTED`] as people read it.
pub const EXPECTED_TEXT: &str = "2.11.x";

/// The library whose version is checked: every libtorch build has it, and
/// the binary links it directly.
pub const LIBRARY: &str = "libtorch_cpu.so";

/// A libtorch version as its files state it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorchVersion {
    pub major: u32,
    pub minor: u32,
    /// The whole string, e.g. `2.11.0+cu130`.
    pub text: String,
}

impl TorchVersion {
    /// Whether this is the [`EXPECTED`] major and minor version.
    pub fn is_expected(&self) -> bool {
        (self.major, self.minor) == EXPECTED
    }
}

/// Parses a version string such as `2.11.0`, `2.11.0+cu130` or `2.11`:
/// numeric major and minor, anything after.
pub fn parse_version(text: &str) -> Option<TorchVersion> {
    let text = text.trim();
    let base = text.split(['+', '-']).next()?;
    let mut parts = base.split('.');
    let major = parts.next()?.parse().ok()?;
    // The minor may carry a pre-release tag (`2.12a0`): its leading digits.
    let minor_part = parts.next()?;
    let digits = minor_part.len()
        - minor_part
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .len();
    let minor = minor_part[..digits].parse().ok()?;
    Some(TorchVersion {
        major,
        minor,
        text: text.to_string(),
    })
}

/// The `__version__` of a `torch/version.py`.
pub fn parse_version_py(source: &str) -> Option<TorchVersion> {
    source.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("__version__")?;
        let rest = rest.trim_start();
        // `__version__ = '...'` or `__version__: str = '...'`.
        let value = rest.split_once('=')?.1.trim();
        let quote = value.chars().next().filter(|c| *c == '\'' || *c == '"')?;
        let inner = &value[1..];
        let end = inner.find(quote)?;
        parse_version(&inner[..end])
    })
}

/// The version in a libtorch zip's `build-version` (its first line).
pub fn parse_build_version(source: &str) -> Option<TorchVersion> {
    parse_version(source.lines().next()?)
}

/// The path of the mapped file named `library` in `/proc/self/maps`-format
/// text.
pub fn mapped_library(maps: &str, library: &str) -> Option<PathBuf> {
    maps.lines().find_map(|line| {
        // `addr perms offset dev inode   /path/with maybe spaces`
        let path = &line[line.find('/')?..];
        let path = path.strip_suffix(" (deleted)").unwrap_or(path);
        let path = Path::new(path);
        (path.file_name()? == library).then(|| path.to_path_buf())
    })
}

/// The version of the libtorch whose `lib/` holds `library`: its
/// `version.py` (PyPI wheel), else its `build-version` (libtorch zip).
pub fn version_of_library(library: &Path) -> Result<TorchVersion, String> {
    let root = library
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("{} has no libtorch directory above it", library.display()))?;
    type Parser = fn(&str) -> Option<TorchVersion>;
    let candidates: [(&str, Parser); 2] = [
        ("version.py", parse_version_py),
        ("build-version", parse_build_version),
    ];
    for (name, parse) in candidates {
        let file = root.join(name);
        if let Ok(text) = std::fs::read_to_string(&file) {
            return parse(&text).ok_or_else(|| {
                format!("{} states no version it can be read from", file.display())
            });
        }
    }
    Err(format!(
        "neither version.py nor build-version is in {}",
        root.display()
    ))
}

/// What the start-up check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The loaded libtorch is 2.11.x.
    Expected,
    /// The loaded libtorch is another version: the error to stop with.
    Mismatch(String),
    /// The version could not be determined: the warning to print.
    Unknown(String),
}

/// Checks the libtorch at `library` (the loaded `libtorch_cpu.so`).
pub fn check_library(library: &Path) -> Check {
    match version_of_library(library) {
        Ok(v) if v.is_expected() => Check::Expected,
        Ok(v) => Check::Mismatch(mismatch_message(&v, library)),
        Err(e) => Check::Unknown(format!(
            "cannot tell the version of the libtorch this process loaded ({e}); \
             vlmatch needs libtorch {EXPECTED_TEXT}, going on"
        )),
    }
}

fn mismatch_message(found: &TorchVersion, library: &Path) -> String {
    format!(
        "this vlmatch needs libtorch {EXPECTED_TEXT} but loaded libtorch {} from {}; \
         run `cargo xtask setup` (it provisions torch 2.11.0) and rebuild, \
         or reinstall torch==2.11.0 where that library lives, \
         and check that LD_LIBRARY_PATH names no other torch",
        found.text,
        library.display()
    )
}

/// Checks the libtorch this process loaded: found through
/// `/proc/self/maps`.
pub fn check_loaded() -> Check {
    let maps = match std::fs::read_to_string("/proc/self/maps") {
        Ok(m) => m,
        Err(e) => {
            return Check::Unknown(format!(
                "cannot read /proc/self/maps to find the loaded {LIBRARY} ({e}); \
                 vlmatch needs libtorch {EXPECTED_TEXT}, going on"
            ))
        }
    };
    match mapped_library(&maps, LIBRARY) {
        Some(library) => check_library(&library),
        None => Check::Unknown(format!(
            "{LIBRARY} is not among this process's mapped files; \
             vlmatch needs libtorch {EXPECTED_TEXT}, going on"
        )),
    }
}

/// The start-up check of `main`: prints a warning (once: it runs once) when
/// the version is unknown, and returns the error to stop with on a
/// mismatch. A binary that links extra plugin crates and calls
/// `vlmatch::cli::main` should call this first too.
pub fn check_or_exit() -> Result<(), String> {
    match check_loaded() {
        Check::Expected => Ok(()),
        Check::Mismatch(e) => Err(e),
        Check::Unknown(w) => {
            eprintln!("warning: {w}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        let v = parse_version("2.11.0+cu130").unwrap();
        assert_eq!((v.major, v.minor, v.text.as_str()), (2, 11, "2.11.0+cu130"));
        assert!(v.is_expected());
        assert!(parse_version(" 2.11.3\n").unwrap().is_expected());
        assert!(parse_version("2.11").unwrap().is_expected());
        assert!(!parse_version("2.10.0").unwrap().is_expected());
        assert!(!parse_version("2.1.0").unwrap().is_expected());
        assert!(!parse_version("2.110.0").unwrap().is_expected());
        assert!(!parse_version("3.11.0").unwrap().is_expected());
        assert!(!parse_version("2.12.0.dev20260101+cpu")
            .unwrap()
            .is_expected());
        assert_eq!(parse_version("2.12a0").unwrap().minor, 12);
        for bad in ["", "2", "two.eleven", "2.x", ".11.0", "+cu130", "2..11"] {
            assert_eq!(parse_version(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn version_py_parses() {
        let wheel = "from typing import Optional\n\n__all__ = ['__version__', 'debug']\n\
                     __version__ = '2.11.0+cu130'\ndebug = False\n";
        assert_eq!(parse_version_py(wheel).unwrap().text, "2.11.0+cu130");
        assert_eq!(
            parse_version_py("__version__: str = \"2.10.0\"\n")
                .unwrap()
                .text,
            "2.10.0"
        );
        for bad in [
            "",
            "__all__ = ['__version__']\n",
            "__version__ = get_version()\n",
            "__version__ = '2.11.0\n",
            "__version__ = 'unknown'\n",
            "version = '2.11.0'\n",
        ] {
            assert_eq!(parse_version_py(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn build_version_parses() {
        assert_eq!(
            parse_build_version("2.11.0+cpu\n").unwrap().text,
            "2.11.0+cpu"
        );
        assert!(!parse_build_version("2.10.0\n").unwrap().is_expected());
        assert_eq!(parse_build_version(""), None);
        assert_eq!(parse_build_version("\n2.11.0\n"), None);
    }

    #[test]
    fn the_mapped_library_is_found() {
        let maps = "\
55d0c0000000-55d0c0001000 r--p 00000000 fd:00 1 /work/target/debug/vlmatch
7f0000000000-7f0000100000 r--p 00000000 fd:00 2 /opt/torch libs/lib/libtorch_cpu.so
7f0000100000-7f0000200000 r-xp 00100000 fd:00 2 /opt/torch libs/lib/libtorch_cpu.so
7f0000300000-7f0000400000 rw-p 00000000 00:00 0 [heap]
7f0000400000-7f0000500000 r--p 00000000 fd:00 3 /opt/torch/lib/libtorch_cpu.so.bak
";
        assert_eq!(
            mapped_library(maps, LIBRARY).unwrap(),
            Path::new("/opt/torch libs/lib/libtorch_cpu.so")
        );
        assert_eq!(
            mapped_library("7f00-7f01 r--p 0 0:0 0 [vdso]\n", LIBRARY),
            None
        );
        let deleted = "7f00-7f01 r--p 0 fd:00 9 /x/lib/libtorch_cpu.so (deleted)\n";
        assert_eq!(
            mapped_library(deleted, LIBRARY).unwrap(),
            Path::new("/x/lib/libtorch_cpu.so")
        );
    }

    #[test]
    fn a_library_is_checked_by_the_files_beside_it() {
        let root = std::env::temp_dir().join(format!("vlmatch-version-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let lib = root.join("torch/lib");
        std::fs::create_dir_all(&lib).unwrap();
        let library = lib.join(LIBRARY);

        // Nothing beside it: unknown, a warning rather than an error.
        assert!(matches!(check_library(&library), Check::Unknown(w) if w.contains("going on")));

        // A libtorch zip's build-version.
        std::fs::write(root.join("torch/build-version"), "2.10.0+cpu\n").unwrap();
        match check_library(&library) {
            Check::Mismatch(e) => {
                assert!(e.contains("needs libtorch 2.11.x"), "{e}");
                assert!(e.contains("loaded libtorch 2.10.0+cpu"), "{e}");
                assert!(e.contains(&library.display().to_string()), "{e}");
                assert!(e.contains("cargo xtask setup"), "{e}");
            }
            other => panic!("{other:?}"),
        }

        // The wheel's version.py wins over build-version.
        std::fs::write(
            root.join("torch/version.py"),
            "__version__ = '2.11.0+cu130'\n",
        )
        .unwrap();
        assert_eq!(check_library(&library), Check::Expected);

        // An unreadable version file is unknown, not an error.
        std::fs::write(root.join("torch/version.py"), "__version__ = None\n").unwrap();
        assert!(matches!(check_library(&library), Check::Unknown(w) if w.contains("version.py")));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn this_process_loaded_the_expected_libtorch() {
        // The unit tests link libtorch like the binary does.
        assert_eq!(check_loaded(), Check::Expected);
    }
}
