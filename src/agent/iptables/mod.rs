//! `--iptables`: the DNAT that sends pods' metadata traffic to the agent, kept in place while the
//! agent runs.
//!
//! The rules live in a chain of our own ([`rules::DEFAULT_CHAIN`]), jumped to from the top of
//! `nat PREROUTING`, so that they are found, checked and removed without touching anybody
//! else's rules, and so that rules inserted later by Docker or kube-proxy cannot shadow them.
//! Every change is check-then-add, so starting twice, or next to a chain left by a previous
//! run (`--no-iptables-remove`), converges on the same two rules. A check loop restores them
//! when something else deletes them, and counts each restoration.
//!
//! `iptables` is run as a child process ([`Command`]) behind the [`Runner`] trait, so the logic
//! here is tested against a recording fake without root.

#[cfg(test)]
mod fake;
pub mod rules;

use prometheus_client::metrics::counter::Counter;
use std::future::Future;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use rules::command;
pub use rules::{CONTAINER_IP, Config, ContainerRules, DEFAULT_CHAIN, Interface, METADATA_IP, Rules};

/// How long one `iptables` command may take, waiting for the xtables lock included.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Removal at shutdown is tried this many times (another program may hold the lock).
const REMOVE_ATTEMPTS: u32 = 5;
/// Upper bound on rules deleted in one pass, whatever is found in our chain.
const MAX_DELETIONS: usize = 1000;

/// What one `iptables` command ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Exit status 0. For `-C` and `-S`, a failure means "no such rule" or "no such chain".
    pub success: bool,
    /// Standard output (the rules, for `-S`).
    pub stdout: String,
    /// Standard error, for error messages.
    pub stderr: String,
}

/// Why the rules could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("cannot run {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("iptables {args} did not finish within {COMMAND_TIMEOUT:?}")]
    Timeout { args: String },
    #[error("iptables {args} failed: {stderr}")]
    Failed { args: String, stderr: String },
}

/// Runs one `iptables -t nat` command. The seam between the rule logic and the system.
pub trait Runner: Send + Sync + 'static {
    /// Runs `iptables -w -t nat <args>`.
    fn run(&self, args: &[String]) -> impl Future<Output = Result<Outcome, IptablesError>> + Send;
}

/// The real [`Runner`]: `iptables` as a child process, waiting for the xtables lock (`-w`).
#[derive(Clone, Debug)]
pub struct Command {
    program: Vec<String>,
}

impl Default for Command {
    fn default() -> Command {
        Command { program: vec!["iptables".into()] }
    }
}

impl Command {
    /// Runs `program` (its first element, with the rest as leading arguments) instead of
    /// `iptables`: `iptables-legacy`, say, or `ip netns exec <node> iptables`.
    pub fn with_program(program: Vec<String>) -> Command {
        Command { program }
    }
}

impl Runner for Command {
    async fn run(&self, args: &[String]) -> Result<Outcome, IptablesError> {
        let (program, leading) = self.program.split_first().map_or(("iptables", &[][..]), |(p, l)| (p, l));
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(leading)
            .args(["-w", "-t", "nat"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|source| IptablesError::Spawn { program: program.into(), source })?;
        let output = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| IptablesError::Timeout { args: args.join(" ") })?
            .map_err(|source| IptablesError::Spawn { program: program.into(), source })?;
        Ok(Outcome {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// The interception rules of one agent, and what keeps them in place.
pub struct Interception<R> {
    runner: R,
    rules: Rules,
    config: Config,
    /// `kiam_agent_iptables_restorations_total`, counted directly.
    restorations: Counter,
}

impl<R: Runner> Interception<R> {
    /// Rules for `config`, changed through `runner`.
    pub fn new(runner: R, config: Config) -> Interception<R> {
        Interception { runner, rules: Rules::new(&config), config, restorations: Counter::default() }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The rules.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// How many times the check loop found the rules missing or changed and put them back.
    pub fn restorations(&self) -> u64 {
        self.restorations.get()
    }

    /// Counts restorations into `counter` (the process's registered metric).
    pub fn counting_into(mut self, counter: Counter) -> Interception<R> {
        self.restorations = counter;
        self
    }

    async fn must(&self, args: Vec<String>) -> Result<Outcome, IptablesError> {
        let outcome = self.runner.run(&args).await?;
        if outcome.success {
            Ok(outcome)
        } else {
            Err(IptablesError::Failed { args: args.join(" "), stderr: outcome.stderr })
        }
    }

    async fn holds(&self, args: Vec<String>) -> Result<bool, IptablesError> {
        Ok(self.runner.run(&args).await?.success)
    }

    /// Makes the rules what they should be: our chain holding exactly our DNAT rules, and the
    /// jumps at the top of `PREROUTING` (and `OUTPUT`) where they are not there. Returns whether
    /// anything changed.
    ///
    /// Our rules are put in first and stale rules deleted after, so there is no moment without
    /// interception while a chain left by an earlier configuration is replaced.
    pub async fn install(&self) -> Result<bool, IptablesError> {
        let chain = self.rules.chain.as_str();
        let mut changed = false;
        let listing = self.runner.run(&command("-S", chain, &[])).await?;
        let rules_in_chain = if listing.success {
            listing.stdout.lines().filter(|l| l.starts_with("-A ")).count()
        } else {
            self.must(command("-N", chain, &[])).await?;
            changed = true;
            0
        };
        let wanted = self.rules.in_chain();
        let mut present = rules_in_chain == wanted.len();
        for rule in &wanted {
            present = present && self.holds(command("-C", chain, rule)).await?;
        }
        if !present {
            for (at, rule) in wanted.iter().enumerate() {
                let mut insert = vec![(at + 1).to_string()];
                insert.extend_from_slice(rule);
                self.must(command("-I", chain, &insert)).await?;
            }
            let first_stale = (wanted.len() + 1).to_string();
            for _ in 0..rules_in_chain.min(MAX_DELETIONS) {
                self.must(command("-D", chain, std::slice::from_ref(&first_stale))).await?;
            }
            changed = true;
        }
        for (builtin, jump) in self.rules.jumps() {
            if !self.holds(command("-C", builtin, jump)).await? {
                let mut insert = vec!["1".to_string()];
                insert.extend_from_slice(jump);
                self.must(command("-I", builtin, &insert)).await?;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Whether every rule is in place (and nothing else in our chain).
    pub async fn is_installed(&self) -> Result<bool, IptablesError> {
        let chain = self.rules.chain.as_str();
        let listing = self.runner.run(&command("-S", chain, &[])).await?;
        let wanted = self.rules.in_chain();
        if !listing.success || listing.stdout.lines().filter(|l| l.starts_with("-A ")).count() != wanted.len()
        {
            return Ok(false);
        }
        for rule in wanted {
            if !self.holds(command("-C", chain, rule)).await? {
                return Ok(false);
            }
        }
        for (builtin, jump) in self.rules.jumps() {
            if !self.holds(command("-C", builtin, jump)).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Deletes the jumps (every copy) and our chain. Rules that are already gone are fine.
    pub async fn remove(&self) -> Result<(), IptablesError> {
        let chain = self.rules.chain.as_str();
        for (builtin, jump) in self.rules.jumps() {
            for _ in 0..MAX_DELETIONS {
                if !self.holds(command("-D", builtin, jump)).await? {
                    break;
                }
            }
        }
        if self.holds(command("-S", chain, &[])).await? {
            self.must(command("-F", chain, &[])).await?;
            self.must(command("-X", chain, &[])).await?;
        }
        Ok(())
    }

    /// [`Interception::remove`], retried a few times: a failure leaves pods intercepted by a rule
    /// pointing at a stopped agent, which fails closed but should be rare.
    pub async fn remove_with_retries(&self) -> Result<(), IptablesError> {
        let mut attempt = 1;
        loop {
            match self.remove().await {
                Ok(()) => return Ok(()),
                Err(error) if attempt < REMOVE_ATTEMPTS => {
                    tracing::warn!(%error, attempt, "cannot remove the iptables rules yet; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Checks the rules every `check_interval` until `shutdown`, and restores them when they
    /// are missing or changed.
    pub async fn keep_installed(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(self.config.check_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the first tick is immediate, and install() has just run
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            match self.install().await {
                Ok(false) => {}
                Ok(true) => {
                    let n = self.restorations.inc() + 1;
                    tracing::warn!(chain = %self.rules.chain, restorations = n, "iptables rules were missing or changed; restored");
                }
                Err(error) => tracing::error!(%error, "cannot check the iptables rules"),
            }
        }
    }
}

#[cfg(test)]
mod tests;
