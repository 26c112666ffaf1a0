//! `cargo xtask`: the project's entry points for people and CI.
//!
//! xtask has no dependencies and never links libtorch. It provisions libtorch
//! (see [`setup`]), then runs cargo with the right package and arguments.

mod browser;
mod gpu_bundle;
mod launch;
mod setup;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  train [--nproc-per-node N [--grace-secs S]] [--config F]... [--set k=v]... [--run-dir D] [--resume D]
                 train a model (default: the tiny preset on the built-in data);
                 with --nproc-per-node, N data-parallel ranks on this machine
                 (torchrun's variables; stderr lines prefixed [rank r]; when
                 a rank fails the others get S seconds, default 30, to stop)
  test [args]    run the whole test suite (extra args go to `cargo test`)
  plugins        list registered plugins by kind
  eval --checkpoint D --task retrieval|matching|zeroshot|vqa|snli-ve|nlvr2 --data F [--image-root D]
       [--labels F] [--split S] [--set k=v]...
                 evaluate a trained run
  finetune --task vqa|snli-ve|nlvr2 --checkpoint D --data F|builtin [--steps N] [--lr X]
       [--val F] [--test F] [--eval-every N] [--blank-images]
                 fine-tune a pretrained run for VQA, SNLI-VE or NLVR2
  export --checkpoint D --out DIR
                 write the image and text encoders for transformers' from_pretrained
  explain --checkpoint D --image IMG --text \"...\" [--html FILE]
                 each caption word's probability of not matching the image
  neggen --checkpoint D --data F [--image-root D] --out FILE.jsonl
                 write NegGen negatives for a dataset with a trained run
  bench [--preset P] [--config F]... [--set k=v]... [--out D] [--steps N] [--repeats R]
                 time training steps, the data pipeline and NegGen against the
                 PyTorch reference (bench/reference.py); prints ratios, writes D/bench.json;
                 with --annotations N [--annotations-index-only]: open a generated annotation
                 file of N captions in memory and through its index (bench/NOTES.md)
  setup          provision libtorch 2.11.0 and a headless Chromium (apt-get) for
                 tests/serve.rs, and print where they are
  gpu-bundle     build a stripped release binary into gpu-bundle/ for a GPU machine
  vlmatch ARGS   run the vlmatch CLI with any arguments";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(cmd) = args.next() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest: Vec<String> = args.collect();
    let root = project_root();
    let result = match cmd.as_str() {
        "setup" => setup::ensure_libtorch(&root).and_then(|p| {
            println!("libtorch: {}", p.display());
            browser::ensure().map(|b| println!("headless browser: {}", b.display()))
        }),
        "train" => train(&root, &rest),
        "plugins" => run_cli(&root, "plugins", &rest),
        "eval" => run_cli(&root, "eval", &rest),
        "neggen" => run_cli(&root, "neggen", &rest),
        "finetune" => run_cli(&root, "finetune", &rest),
        "explain" => run_cli(&root, "explain", &rest),
        "export" => run_cli(&root, "export", &rest),
        "vlmatch" => run_cli(&root, "", &rest),
        "test" => run_tests(&root, &rest),
        "bench" => bench(&root, &rest),
        "gpu-bundle" => gpu_bundle::build(&root),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("xtask: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: xtask lives one level below it.
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
        .to_path_buf()
}

/// A `cargo` command running in the workspace root with libtorch provisioned.
pub fn cargo(root: &Path) -> Result<Command, String> {
    let libtorch = setup::ensure_libtorch(root)?;
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root).env("LIBTORCH", libtorch);
    Ok(cmd)
}

/// `cargo build` of the `vlmatch` binary, quietly, with `profile` (none, or
/// `--release`).
fn build_vlmatch(root: &Path, profile: &[&str]) -> Result<(), String> {
    let mut build = cargo(root)?;
    build
        .arg("build")
        .args(profile)
        .args(["--quiet", "--package", "vlmatch", "--bin", "vlmatch"]);
    run_status(build)
}

pub fn run_status(mut cmd: Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("command failed ({status}): {shown}"))
    }
}

fn run_cli(root: &Path, sub: &str, rest: &[String]) -> Result<(), String> {
    let mut cmd = cargo(root)?;
    cmd.args([
        "run",
        "--quiet",
        "--package",
        "vlmatch",
        "--bin",
        "vlmatch",
        "--",
    ]);
    if !sub.is_empty() {
        cmd.arg(sub);
    }
    cmd.args(rest);
    run_status(cmd)
}

/// `cargo xtask train`: one process, or `--nproc-per-node N` local ranks of
/// the built binary (see [`launch`]).
fn train(root: &Path, rest: &[String]) -> Result<(), String> {
    let args = launch::parse_args(rest)?;
    let Some(nproc) = args.nproc else {
        return run_cli(root, "train", rest);
    };
    build_vlmatch(root, &[])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| if d.is_absolute() { d } else { root.join(d) })
        .unwrap_or_else(|| root.join("target"));
    let program = target.join("debug").join("vlmatch");
    let libtorch = setup::ensure_libtorch(root)?;
    let mut cli = vec!["train".to_string()];
    cli.extend(args.rest);
    eprintln!(
        "xtask: starting {nproc} ranks of {} (grace period {:.0} s)",
        program.display(),
        args.grace.as_secs_f64()
    );
    let outcome = launch::run_local(
        &program,
        root,
        &cli,
        nproc,
        args.grace,
        &[("LIBTORCH".to_string(), libtorch.into_os_string())],
    )?;
    outcome.result()
}

fn run_tests(root: &Path, rest: &[String]) -> Result<(), String> {
    let mut cmd = cargo(root)?;
    // The benchmark's PyTorch reference is checked against vlmatch's model
    // (tests/bench.rs) with this Python.
    let python = setup::reference_python()?;
    // HuggingFace parity also runs on a real pretrained checkpoint
    // (tests/hf_parity.rs reads every fixture under these directories).
    let fixtures = setup::real_fixtures(root, &python)?;
    let mut dirs = vec![fixtures.display().to_string()];
    if let Ok(more) = std::env::var("VLMATCH_HF_FIXTURES") {
        dirs.push(more);
    }
    cmd.env("VLMATCH_HF_FIXTURES", dirs.join(":"));
    cmd.env("BENCH_REFERENCE_PYTHON", python);
    // tests/serve.rs drives this browser; it fails without one.
    cmd.env("VLMATCH_TEST_CHROMIUM", browser::ensure()?);
    // The fault tests' switches exist only in builds with this feature.
    cmd.args([
        "test",
        "--workspace",
        "--features",
        "vlmatch/fault-injection",
    ])
    .args(rest);
    run_status(cmd)
}

/// `cargo xtask bench`: a release build of `vlmatch bench`, run with the
/// PyTorch reference in the same call.
fn bench(root: &Path, rest: &[String]) -> Result<(), String> {
    build_vlmatch(root, &["--release"])?;
    let mut cmd = Command::new(root.join("target/release/vlmatch"));
    if rest
        .iter()
        .any(|a| a == "--annotations" || a.starts_with("--annotations="))
    {
        // Annotation files held in memory against their index: no reference.
        cmd.current_dir(root).arg("bench").args(rest);
        return run_status(cmd);
    }
    let python = setup::reference_python()?;
    cmd.current_dir(root)
        .arg("bench")
        .arg("--reference")
        .arg(root.join("bench/reference.py"))
        .arg("--python")
        .arg(python)
        .args(rest);
    run_status(cmd)
}
