//! Files the kubelet mounts from Secrets and ConfigMaps and updates in place (within about a
//! minute of a change): a process that read them once at start would serve an expired
//! certificate, refuse tickets signed with a rotated key or keep an old allow-list until it
//! restarted, so it reads them again. One loop for all of them, so every such file behaves
//! alike: a change is used at once, a file that cannot be used changes nothing, and a failure
//! is warned about once, not every `RELOAD_EVERY` for as long as it lasts.

use std::time::Duration;

/// How often mounted files are read again. The kubelet takes up to a minute or so to update a
/// volume; this adds little to that.
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);

/// Every `RELOAD_EVERY`, `read`s the files and hands what it read to `apply` when that differs
/// from the previous read; `apply` keeps what is in use when it returns an error. Runs until
/// its task is aborted.
pub async fn follow<T: PartialEq>(what: &str, mut read: impl FnMut() -> anyhow::Result<T>, mut apply: impl FnMut(&T) -> anyhow::Result<()>) {
    let mut follower = Follower::default();
    loop {
        tokio::time::sleep(RELOAD_EVERY).await;
        match follower.step(read(), &mut apply) {
            Some(Warning::CannotRead(e)) => tracing::warn!(error = %e, "{what}: cannot read the files again; keeping what is in use"),
            Some(Warning::NotUsable(e)) => tracing::warn!(error = %e, "{what}: changed, but not usable; keeping what is in use"),
            None => {}
        }
    }
}

/// What `follow` remembers between reads.
struct Follower<T> {
    /// What was read last, used or not: a change that could not be used is not tried again.
    last: Option<T>,
    /// The read failure warned about last, while reads keep failing with it.
    read_error: Option<String>,
}

impl<T> Default for Follower<T> {
    fn default() -> Self {
        Follower { last: None, read_error: None }
    }
}

#[derive(Debug, PartialEq)]
enum Warning {
    CannotRead(String),
    NotUsable(String),
}

impl<T: PartialEq> Follower<T> {
    /// Takes one read's outcome: applies a change, and says what to warn about (each failure
    /// once: a read failure until reads work again, an unusable change until the next change).
    fn step(&mut self, read: anyhow::Result<T>, apply: &mut impl FnMut(&T) -> anyhow::Result<()>) -> Option<Warning> {
        let read = match read {
            Ok(read) => read,
            Err(e) => {
                let e = format!("{e:#}");
                if self.read_error.as_ref() == Some(&e) {
                    return None;
                }
                self.read_error = Some(e.clone());
                return Some(Warning::CannotRead(e));
            }
        };
        self.read_error = None;
        if self.last.as_ref() == Some(&read) {
            return None;
        }
        let applied = apply(&read);
        self.last = Some(read);
        applied.err().map(|e| Warning::NotUsable(format!("{e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_applied_once_and_each_failure_warned_once() {
        let mut applied = Vec::new();
        // Odd numbers do not parse, as a half-written file would not.
        let mut apply = |n: &u32| {
            applied.push(*n);
            if n % 2 == 1 { anyhow::bail!("{n} is odd") } else { Ok(()) }
        };
        let mut f = Follower::default();
        let gone = || Err(anyhow::anyhow!("cannot read tls.crt: gone"));
        let steps = [
            (f.step(Ok(2), &mut apply), None),
            (f.step(Ok(2), &mut apply), None),
            (f.step(gone(), &mut apply), Some(Warning::CannotRead("cannot read tls.crt: gone".into()))),
            (f.step(gone(), &mut apply), None),
            (f.step(Ok(2), &mut apply), None),
            // Reads worked in between: the same failure is news again.
            (f.step(gone(), &mut apply), Some(Warning::CannotRead("cannot read tls.crt: gone".into()))),
            (f.step(Ok(3), &mut apply), Some(Warning::NotUsable("3 is odd".into()))),
            (f.step(Ok(3), &mut apply), None),
            (f.step(Ok(4), &mut apply), None),
            (f.step(Ok(3), &mut apply), Some(Warning::NotUsable("3 is odd".into()))),
        ];
        for (i, (warned, expected)) in steps.into_iter().enumerate() {
            assert_eq!(warned, expected, "step {i}");
        }
        assert_eq!(applied, [2, 3, 4, 3], "only changes are applied, each once");
    }
}
