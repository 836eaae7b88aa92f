//! The `stackfs` command: mkfs, mount, umount, info, fsck, passwd. The
//! arguments and one module per command are in `cli/`; this is the entry
//! point: process setup, the mount.fuse calling convention, and dispatch.

mod cli;

use clap::Parser;
use cli::{Cli, Cmd, KeyArgs};
use std::process::ExitCode;

fn main() -> ExitCode {
    // A panic is a bug or damage we did not foresee: one log line with its
    // location, not a backtrace on the user's terminal. Where one can come
    // from data (redb reading a damaged store), it is caught and named.
    std::panic::set_hook(Box::new(|info| {
        let message = stackfs::fs::panic_text(info.payload());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        log::error!("internal error{at}: {message}");
    }));
    // Keys live in this process: no core dumps, no ptrace by other users.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let cli = Cli::parse_from(mount_fuse_arguments(std::env::args().collect()));
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    run(cli.cmd)
}

/// mount.fuse calls `stackfs SOURCE MOUNTPOINT -o OPTS`: treat it as `mount`.
fn mount_fuse_arguments(mut args: Vec<String>) -> Vec<String> {
    let known = ["mkfs", "mount", "umount", "info", "fsck", "passwd", "help"];
    let looks_like_source =
        |a: &str| a.contains(':') || a.contains('/') || std::path::Path::new(a).exists();
    if args.len() > 2
        && !known.contains(&args[1].as_str())
        && looks_like_source(&args[1])
        && !args[2].starts_with('-')
    {
        args.insert(1, "mount".into());
    }
    args
}

/// Run a command: fsck exits with its own codes; the others print their
/// error as `stackfs: MESSAGE` and exit 1.
fn run(cmd: Cmd) -> ExitCode {
    let result = match cmd {
        Cmd::Fsck {
            source,
            repair,
            verify_data,
            key,
        } => return ExitCode::from(cli::fsck::fsck(&source, repair, verify_data, &key)),
        Cmd::Scrub {
            source,
            rate,
            stop,
            json,
            key,
        } => return ExitCode::from(cli::jobs::scrub(&source, rate, stop, json, &key)),
        Cmd::Replace {
            source,
            old,
            new,
            no_wait,
        } => cli::jobs::replace(&source, &old, &new, no_wait),
        Cmd::DebugNonces { source, key } => cli::debug::nonces(&source, &key),
        Cmd::DebugDamage { source, what, key } => cli::debug::damage(&source, &what, &key),
        Cmd::Mkfs(args) => cli::mkfs::mkfs(args),
        Cmd::Passwd {
            source,
            key,
            new_passphrase_file,
            new_key_file,
        } => cli::passwd::passwd(
            &source,
            &key,
            KeyArgs {
                passphrase_file: new_passphrase_file,
                key_file: new_key_file,
            },
        ),
        Cmd::Mount {
            foreground,
            options,
            source,
            mountpoint,
        } => cli::mount::mount(foreground, &options, &source, mountpoint),
        Cmd::Info { source, key, json } => cli::info::info(&source, &key, json),
        Cmd::Umount {
            target,
            lazy,
            force,
            ..
        } => cli::umount::umount(&target, lazy, force),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(cli::CliError::Reported) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("stackfs: {e}");
            ExitCode::FAILURE
        }
    }
}
