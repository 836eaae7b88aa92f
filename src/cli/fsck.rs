//! `stackfs fsck`: check (and repair) a pool that is not mounted. The exit
//! code follows the kind of failure (`FsError`), never its words.

use super::open::open_fs;
use super::KeyArgs;
use stackfs::error::FsError;
use stackfs::fsck::{self, Report};

/// fsck's exit code for a check that could not finish: damage to what is
/// stored is an error left (a store that cannot be opened is damage, not a
/// usage error); anything else means the pool could not be checked.
fn exit_code_of(error: &FsError) -> u8 {
    if error.is_damage() {
        fsck::UNCORRECTED
    } else {
        fsck::OPERATIONAL
    }
}

/// Check the pool; returns fsck's exit code (0 clean, 1 corrected, 4
/// errors left, 8 could not check).
pub fn fsck(source: &str, repair: bool, verify_data: bool, key: &KeyArgs) -> u8 {
    let fs = match open_fs(source, key, !repair) {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!("stackfs fsck: {e}");
            return exit_code_of(&e);
        }
    };
    let report = match check(&fs, verify_data, repair) {
        Ok(report) => report,
        Err(code) => return code,
    };
    for problem in &report.problems {
        println!("{problem}");
    }
    let code = report.exit_code();
    println!(
        "{source}: {} inodes, {} extents; {} problem(s), {} repaired",
        report.inodes,
        report.extents,
        report.problems.len(),
        report.repaired
    );
    code
}

/// Run the check with a progress bar; a failure is said here and given as
/// its exit code. A panic from the store (redb reading damaged pages) is
/// damage, named.
fn check(fs: &stackfs::fs::Fs, verify_data: bool, repair: bool) -> Result<Report, u8> {
    let bar =
        indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} extents")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("checking");
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        fsck::check(fs, verify_data, repair, &progress)
    }));
    bar.finish_and_clear();
    match checked {
        Ok(Ok(report)) => Ok(report),
        Ok(Err(e)) => {
            eprintln!("stackfs fsck: {e}");
            Err(exit_code_of(&e))
        }
        Err(panic) => {
            eprintln!(
                "stackfs fsck: metadata store is damaged: {}",
                stackfs::fs::panic_text(&*panic)
            );
            Err(fsck::UNCORRECTED)
        }
    }
}
