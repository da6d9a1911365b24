//! Running the external programs the tasks are made of. Each command is
//! echoed before it runs so that a log shows exactly what to re-run by hand.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Runs `cmd` with inherited stdio and fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    println!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Like [`run`], with `input` written to the command's stdin.
pub fn run_with_stdin(cmd: &mut Command, input: &str) -> Result<()> {
    let shown = display(cmd);
    // A bash here-string, which supplies the final newline itself.
    println!("$ {shown} <<< {}", quote(input.trim_end_matches('\n')));
    let mut child = cmd
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    // Taking stdin and dropping it at the end of the statement closes the
    // pipe, so the child sees end of input and can exit.
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes())
        .with_context(|| format!("cannot write to `{shown}`"))?;
    let status = child.wait()?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly to look at something: its trimmed stdout if it started
/// and succeeded, `None` otherwise (a missing program counts as a failure,
/// which is what the callers want to know).
pub fn probe(cmd: &mut Command) -> Option<String> {
    let output = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// `cmd` as a shell-like line, with the environment it sets in front, so the
/// echo can be pasted back into a shell.
pub fn display(cmd: &Command) -> String {
    let mut words = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            words.push(format!(
                "{}={}",
                key.to_string_lossy(),
                quote(&value.to_string_lossy())
            ));
        }
    }
    words.push(quote(&cmd.get_program().to_string_lossy()));
    words.extend(cmd.get_args().map(|arg| quote(&arg.to_string_lossy())));
    words.join(" ")
}

fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.to_owned()
    } else if word.chars().any(char::is_control) {
        // Control characters (the \x1f in CARGO_ENCODED_RUSTFLAGS) would be
        // invisible in a log; bash's $'...' spells them out and still pastes.
        let mut quoted = String::from("$'");
        for c in word.chars() {
            match c {
                '\'' | '\\' => quoted.extend(['\\', c]),
                c if c.is_control() => quoted.push_str(&format!("\\x{:02x}", u32::from(c))),
                c => quoted.push(c),
            }
        }
        quoted.push('\'');
        quoted
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::display;

    #[test]
    fn display_can_be_pasted_into_bash() {
        let mut cmd = Command::new("cargo");
        cmd.env("FLAGS", "a\x1fb 'c'")
            .args(["build", "--features", "x y", "it's"]);
        assert_eq!(
            display(&cmd),
            r"FLAGS=$'a\x1fb \'c\'' cargo build --features 'x y' 'it'\''s'"
        );
    }
}
