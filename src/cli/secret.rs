//! The secret that unlocks an encrypted pool: from a key file, a passphrase
//! file, the environment, or a prompt.

use super::KeyArgs;
use stackfs::keys::Secret;
use zeroize::Zeroizing;

/// The secret from a key file, a passphrase file, the environment variable
/// `env`, or a prompt without echo (asked twice when `confirm`); `what`
/// names it in the prompt and in errors.
pub fn secret(key: &KeyArgs, env: &str, confirm: bool, what: &str) -> Result<Secret, String> {
    if let Some(file) = &key.key_file {
        return Secret::key_file(file);
    }
    if let Some(file) = &key.passphrase_file {
        return Secret::passphrase_file(file);
    }
    if let Ok(passphrase) = std::env::var(env) {
        // Not left in the environment, where /proc/PID/environ shows it.
        std::env::remove_var(env);
        if !passphrase.is_empty() {
            return Ok(Secret::Passphrase(Zeroizing::new(passphrase.into_bytes())));
        }
    }
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(0) } != 1 {
        return Err(format!("no {what}: give --passphrase-file FILE, --key-file FILE or {env} (no terminal to ask on)"));
    }
    let ask = |prompt: &str| {
        rpassword::prompt_password(prompt)
            .map(|p| Zeroizing::new(p.into_bytes()))
            .map_err(|e| e.to_string())
    };
    let passphrase = ask(&format!("{what}: "))?;
    if passphrase.is_empty() {
        return Err(format!("empty {what}"));
    }
    if confirm && *ask(&format!("{what} again: "))? != *passphrase {
        return Err(format!("the two {what}s differ"));
    }
    Ok(Secret::Passphrase(passphrase))
}

/// The current secret of a pool, for the commands that unlock one.
pub fn passphrase(key: &KeyArgs) -> Result<Secret, String> {
    secret(key, "STACKFS_PASSPHRASE", false, "passphrase")
}
