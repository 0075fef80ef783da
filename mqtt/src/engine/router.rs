//! Subscriptions, arranged so that routing a publish does not look at every subscription:
//! filters without wildcards sit in a hash map keyed by the topic, wildcard filters in a trie
//! walked level by level.

use std::collections::HashMap;

use super::types::SessionIdx;
use crate::codec::QoS;

/// One subscriber of a filter.
pub(super) type Sub = (SessionIdx, QoS);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Label {
    Plus,
    Name(Box<str>),
}

#[derive(Debug)]
struct Node {
    parent: usize,
    label: Label,
    children: HashMap<Box<str>, usize>,
    plus: Option<usize>,
    /// Filters ending at this node.
    here: Vec<Sub>,
    /// Filters ending in `#` below this node.
    hash: Vec<Sub>,
}

impl Node {
    fn new(parent: usize, label: Label) -> Self {
        Node {
            parent,
            label,
            children: HashMap::new(),
            plus: None,
            here: Vec::new(),
            hash: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.here.is_empty()
            && self.hash.is_empty()
    }
}

const ROOT: usize = 0;

/// Every subscription of every session.
#[derive(Debug)]
pub(super) struct Router {
    exact: HashMap<Box<str>, Vec<Sub>>,
    nodes: Vec<Node>,
    free: Vec<usize>,
    wildcards: usize,
    /// Walk stack, kept to avoid allocating per publish: (node, offset of the rest of the
    /// topic, or `None` when the topic is used up).
    stack: Vec<(usize, Option<usize>)>,
}

fn has_wildcard(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

/// Sets `session`'s entry in `subs` to `qos`; true if it was new.
fn upsert(subs: &mut Vec<Sub>, session: SessionIdx, qos: QoS) -> bool {
    match subs.iter_mut().find(|(s, _)| *s == session) {
        Some(entry) => {
            entry.1 = qos;
            false
        }
        None => {
            subs.push((session, qos));
            true
        }
    }
}

fn remove_from(subs: &mut Vec<Sub>, session: SessionIdx) -> bool {
    match subs.iter().position(|(s, _)| *s == session) {
        Some(i) => {
            subs.swap_remove(i);
            true
        }
        None => false,
    }
}

impl Default for Router {
    fn default() -> Self {
        Router {
            exact: HashMap::new(),
            nodes: vec![Node::new(ROOT, Label::Plus)],
            free: Vec::new(),
            wildcards: 0,
            stack: Vec::new(),
        }
    }
}

impl Router {
    /// Subscribes `session` to the valid `filter` at `qos`, replacing an earlier grant.
    pub(super) fn insert(&mut self, filter: &str, session: SessionIdx, qos: QoS) {
        if !has_wildcard(filter) {
            let subs = self.exact.entry(filter.into()).or_default();
            upsert(subs, session, qos);
            return;
        }
        let mut node = ROOT;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                if upsert(&mut self.nodes[node].hash, session, qos) {
                    self.wildcards += 1;
                }
                return;
            }
            node = self.child(node, level);
        }
        if upsert(&mut self.nodes[node].here, session, qos) {
            self.wildcards += 1;
        }
    }

    /// The child of `node` for `level`, created if missing.
    fn child(&mut self, node: usize, level: &str) -> usize {
        let existing = if level == "+" {
            self.nodes[node].plus
        } else {
            self.nodes[node].children.get(level).copied()
        };
        if let Some(c) = existing {
            return c;
        }
        let label = if level == "+" {
            Label::Plus
        } else {
            Label::Name(level.into())
        };
        let fresh = Node::new(node, label);
        let c = match self.free.pop() {
            Some(i) => {
                self.nodes[i] = fresh;
                i
            }
            None => {
                self.nodes.push(fresh);
                self.nodes.len() - 1
            }
        };
        if level == "+" {
            self.nodes[node].plus = Some(c);
        } else {
            self.nodes[node].children.insert(level.into(), c);
        }
        c
    }

    /// The node of `filter`'s levels (without a final `#`), if it exists.
    fn find(&self, levels: &[&str]) -> Option<usize> {
        let mut node = ROOT;
        for level in levels {
            let n = self.nodes.get(node)?;
            node = if *level == "+" {
                n.plus?
            } else {
                *n.children.get(*level)?
            };
        }
        Some(node)
    }

    /// Removes `session`'s subscription to `filter`, if any.
    pub(super) fn remove(&mut self, filter: &str, session: SessionIdx) {
        if !has_wildcard(filter) {
            if let Some(subs) = self.exact.get_mut(filter) {
                remove_from(subs, session);
                if subs.is_empty() {
                    self.exact.remove(filter);
                }
            }
            return;
        }
        let mut levels: Vec<&str> = filter.split('/').collect();
        let hash = levels.last() == Some(&"#");
        if hash {
            levels.pop();
        }
        let Some(node) = self.find(&levels) else {
            return;
        };
        let list = if hash {
            &mut self.nodes[node].hash
        } else {
            &mut self.nodes[node].here
        };
        if remove_from(list, session) {
            self.wildcards = self.wildcards.saturating_sub(1);
        }
        self.prune(node);
    }

    /// Frees empty nodes from `node` up towards the root.
    fn prune(&mut self, mut node: usize) {
        while node != ROOT && self.nodes[node].is_empty() {
            let parent = self.nodes[node].parent;
            match std::mem::replace(&mut self.nodes[node].label, Label::Plus) {
                Label::Plus => self.nodes[parent].plus = None,
                Label::Name(name) => {
                    self.nodes[parent].children.remove(&name);
                }
            }
            self.free.push(node);
            node = parent;
        }
    }

    /// Appends every subscription matching the valid topic name `topic` to `out` (a session
    /// may appear several times, once per matching filter).
    pub(super) fn matches(&mut self, topic: &str, out: &mut Vec<Sub>) {
        if let Some(subs) = self.exact.get(topic) {
            out.extend_from_slice(subs);
        }
        if self.wildcards == 0 {
            return;
        }
        // [MQTT-4.7.2-1]: filters starting with a wildcard do not match `$` topics.
        let dollar = topic.starts_with('$');
        self.stack.clear();
        self.stack.push((ROOT, Some(0)));
        while let Some((n, rest)) = self.stack.pop() {
            let Some(node) = self.nodes.get(n) else {
                continue;
            };
            let at_root_of_dollar = n == ROOT && dollar;
            if !at_root_of_dollar {
                out.extend_from_slice(&node.hash);
            }
            let Some(start) = rest else {
                out.extend_from_slice(&node.here);
                continue;
            };
            let tail = topic.get(start..).unwrap_or("");
            let (level, next) = match tail.find('/') {
                Some(i) => (&tail[..i], Some(start + i + 1)),
                None => (tail, None),
            };
            if let Some(&c) = node.children.get(level) {
                self.stack.push((c, next));
            }
            if let Some(p) = node.plus {
                if !at_root_of_dollar {
                    self.stack.push((p, next));
                }
            }
        }
    }

    /// Number of live trie nodes (for tests: pruning works).
    #[cfg(test)]
    pub(super) fn live_nodes(&self) -> usize {
        self.nodes.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic;

    fn matched(r: &mut Router, t: &str) -> Vec<Sub> {
        let mut out = Vec::new();
        r.matches(t, &mut out);
        out.sort();
        out
    }

    const FILTERS: &[&str] = &[
        "a/b",
        "a/+",
        "a/#",
        "#",
        "+",
        "+/+",
        "/+",
        "sport/#",
        "sport/+",
        "$SYS/#",
        "+/monitor",
        "a/+/c",
        "a//c",
        "+/b/#",
        "a/b/c/d",
    ];
    const TOPICS: &[&str] = &[
        "a/b",
        "a",
        "a/b/c",
        "a//c",
        "/finance",
        "sport",
        "sport/",
        "$SYS/monitor",
        "x/monitor",
        "a/x/c",
        "a/b/c/d",
        "b",
    ];

    #[test]
    fn trie_agrees_with_section_4_7_matching() {
        let mut r = Router::default();
        for (i, f) in FILTERS.iter().enumerate() {
            r.insert(f, i, QoS::AtLeastOnce);
        }
        for t in TOPICS {
            let want: Vec<Sub> = FILTERS
                .iter()
                .enumerate()
                .filter(|(_, f)| topic::matches(f, t))
                .map(|(i, _)| (i, QoS::AtLeastOnce))
                .collect();
            assert_eq!(matched(&mut r, t), want, "topic {t}");
        }
    }

    #[test]
    fn resubscribe_replaces_and_remove_prunes() {
        let mut r = Router::default();
        let before = r.live_nodes();
        r.insert("a/+/c", 1, QoS::AtMostOnce);
        r.insert("a/+/c", 1, QoS::ExactlyOnce);
        assert_eq!(matched(&mut r, "a/b/c"), vec![(1, QoS::ExactlyOnce)]);
        r.insert("a/#", 2, QoS::AtMostOnce);
        r.remove("a/+/c", 1);
        r.remove("a/#", 2);
        r.remove("a/#", 2);
        assert!(matched(&mut r, "a/b/c").is_empty());
        assert_eq!(r.live_nodes(), before);
        r.insert("x", 3, QoS::AtMostOnce);
        r.remove("x", 3);
        assert!(r.exact.is_empty());
    }
}
