//! One change signal per node, so that a change wakes only the node views it can alter: with one
//! cluster-wide signal, 200 pod changes a second woke each of 2,000 subscribed nodes' feeds 200
//! times a second, to find that its own node had not changed (figure 11).
//!
//! A node's signal exists while something watches it: [`NodeSignals::subscribe`] creates it, and
//! a wake finding no receiver left drops it. So the map holds at most one signal per node whose
//! agent subscribed, and only until that node's next change (or the next relist) after its last
//! agent left.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use tokio::sync::watch;

/// The signals, by node name.
#[derive(Default)]
pub struct NodeSignals(Mutex<HashMap<String, watch::Sender<()>>>);

impl NodeSignals {
    /// A receiver that changes whenever something that may alter `node`'s entries is applied
    /// after this call. The sender lives while the receiver does, so `changed()` never fails.
    pub fn subscribe(&self, node: &str) -> watch::Receiver<()> {
        let mut signals = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match signals.get(node) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(());
                signals.insert(node.to_string(), tx);
                rx
            }
        }
    }

    /// Wakes the watchers of `nodes`; drops the signals nobody watches any more.
    pub fn wake(&self, nodes: &[String]) {
        let mut signals = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for node in nodes {
            if signals.get(node).is_some_and(|tx| tx.send(()).is_err()) {
                signals.remove(node);
            }
        }
    }

    /// Wakes the watchers of every node (a relist ended); drops the signals nobody watches.
    pub fn wake_all(&self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).retain(|_, tx| tx.send(()).is_ok());
    }

    /// How many nodes have a signal.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wake_reaches_only_the_nodes_named() {
        let signals = NodeSignals::default();
        let (a, b) = (signals.subscribe("a"), signals.subscribe("b"));
        signals.wake(&["a".to_string()]);
        assert_eq!((a.has_changed().ok(), b.has_changed().ok()), (Some(true), Some(false)));
        signals.wake_all();
        assert_eq!(b.has_changed().ok(), Some(true));
    }

    #[test]
    fn a_signal_nobody_watches_is_dropped_at_its_next_wake() {
        let signals = NodeSignals::default();
        let (a, b) = (signals.subscribe("a"), signals.subscribe("b"));
        let again = signals.subscribe("a");
        drop(a);
        signals.wake(&["a".to_string()]);
        assert_eq!((signals.len(), again.has_changed().ok()), (2, Some(true)));
        drop((again, b));
        signals.wake(&["a".to_string()]);
        assert_eq!(signals.len(), 1);
        signals.wake_all();
        assert_eq!(signals.len(), 0);
        // A new watcher gets a fresh signal.
        let fresh = signals.subscribe("b");
        signals.wake(&["b".to_string()]);
        assert_eq!(fresh.has_changed().ok(), Some(true));
    }
}
