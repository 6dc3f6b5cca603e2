//! The two rules of one address family (`iptables` or `ip6tables`): our chain holding exactly
//! the DNAT, and the jump to it as the first rule of `nat PREROUTING`. First, not merely
//! present: a rule inserted above it later (Docker's, kube-proxy's) could otherwise send
//! metadata traffic elsewhere before it reaches ours.

use super::rules::command;
use super::{IptablesError, MAX_DELETIONS, Outcome, Rules, Runner, Tool};

/// One family's rules, changed through a runner.
pub(super) struct Family<'a, R> {
    pub runner: &'a R,
    pub tool: Tool,
    pub rules: &'a Rules,
}

impl<R: Runner> Family<'_, R> {
    async fn must(&self, args: Vec<String>) -> Result<Outcome, IptablesError> {
        let outcome = self.runner.run(self.tool, &args).await?;
        if outcome.success {
            Ok(outcome)
        } else {
            Err(IptablesError::Failed { args: args.join(" "), stderr: outcome.stderr })
        }
    }

    async fn holds(&self, args: Vec<String>) -> Result<bool, IptablesError> {
        Ok(self.runner.run(self.tool, &args).await?.success)
    }

    /// The numbers (from 1) of the `builtin` chain's rules that jump to our chain, and whether
    /// only jumps to our chains (the metadata's, the container endpoint's) come before the first.
    async fn jumps(&self, builtin: &str) -> Result<(Vec<usize>, bool), IptablesError> {
        let listing = self.must(command("-S", builtin, &[])).await?;
        let target = format!(" -j {}", self.rules.chain);
        let kin = format!(" -j {}", self.rules.chain.trim_end_matches("-CT"));
        let rules: Vec<&str> =
            listing.stdout.lines().filter(|l| l.starts_with("-A ")).map(str::trim_end).collect();
        let ours: Vec<usize> =
            rules.iter().enumerate().filter(|(_, l)| l.ends_with(&target)).map(|(i, _)| i + 1).collect();
        let first = ours.first().copied().unwrap_or(0);
        let on_top = first > 0 && rules[..first - 1].iter().all(|l| l.contains(&kin));
        Ok((ours, on_top))
    }

    /// Makes the rules what they should be. Returns whether anything changed.
    ///
    /// New rules are put in first and stale ones deleted after, so there is no moment without
    /// interception while a chain (or a jump) left by an earlier configuration is replaced.
    pub async fn install(&self) -> Result<bool, IptablesError> {
        let chain = self.rules.chain.as_str();
        let mut changed = false;
        let listing = self.runner.run(self.tool, &command("-S", chain, &[])).await?;
        let rules_in_chain = if listing.success {
            listing.stdout.lines().filter(|l| l.starts_with("-A ")).count()
        } else {
            self.must(command("-N", chain, &[])).await?;
            changed = true;
            0
        };
        let present = rules_in_chain > 0 && self.holds(command("-C", chain, &self.rules.dnat)).await?;
        if !(present && rules_in_chain == 1) {
            let mut insert = vec!["1".to_string()];
            insert.extend_from_slice(&self.rules.dnat);
            self.must(command("-I", chain, &insert)).await?;
            for _ in 0..rules_in_chain.min(MAX_DELETIONS) {
                self.must(command("-D", chain, &["2".to_string()])).await?;
            }
            changed = true;
        }
        for builtin in self.rules.builtins {
            let (jumps, on_top) = self.jumps(builtin).await?;
            let exact = self.holds(command("-C", builtin, &self.rules.jump)).await?;
            if !(exact && jumps.len() == 1 && on_top) {
                let mut insert = vec!["1".to_string()];
                insert.extend_from_slice(&self.rules.jump);
                self.must(command("-I", builtin, &insert)).await?;
                // Every other jump to our chain moved down by one; delete them from the bottom up.
                for n in jumps.iter().rev().take(MAX_DELETIONS) {
                    self.must(command("-D", builtin, &[(n + 1).to_string()])).await?;
                }
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Whether both rules are in place: the DNAT alone in our chain, the jump first.
    pub async fn is_installed(&self) -> Result<bool, IptablesError> {
        let chain = self.rules.chain.as_str();
        let listing = self.runner.run(self.tool, &command("-S", chain, &[])).await?;
        if !listing.success || listing.stdout.lines().filter(|l| l.starts_with("-A ")).count() != 1 {
            return Ok(false);
        }
        if !self.holds(command("-C", chain, &self.rules.dnat)).await? {
            return Ok(false);
        }
        for builtin in self.rules.builtins {
            let (jumps, on_top) = self.jumps(builtin).await?;
            if !(self.holds(command("-C", builtin, &self.rules.jump)).await? && jumps.len() == 1 && on_top) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Deletes the jump (every copy) and our chain. Rules that are already gone are fine.
    pub async fn remove(&self) -> Result<(), IptablesError> {
        let chain = self.rules.chain.as_str();
        for builtin in self.rules.builtins {
            for _ in 0..MAX_DELETIONS {
                if !self.holds(command("-D", builtin, &self.rules.jump)).await? {
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

    /// Deletes the tracked flows to the metadata address. Best effort: a failure is logged,
    /// since the rules themselves are in place and new connections are intercepted.
    pub async fn flush_flows(&self) {
        if self.rules.table == super::rules::Table::Filter {
            return; // the connection limit intercepts nothing
        }
        match self.runner.run(Tool::Conntrack, &self.rules.flush()).await {
            // conntrack exits 1 when there was nothing to delete.
            Ok(outcome) if outcome.success || outcome.stderr.contains("0 flow entries") => {
                tracing::debug!(metadata = %self.rules.metadata, result = %outcome.stderr, "conntrack flushed");
            }
            Ok(outcome) => {
                tracing::warn!(metadata = %self.rules.metadata, stderr = %outcome.stderr, "conntrack -D failed")
            }
            Err(error) => tracing::warn!(%error, "cannot delete the tracked metadata flows"),
        }
    }
}
