//! Retained messages: one per topic [MQTT-3.3.1-5].

use std::collections::HashMap;
use std::sync::Arc;

use super::types::Message;
use crate::topic;

/// The retained message of every topic that has one.
#[derive(Debug, Default)]
pub(super) struct Retained {
    by_topic: HashMap<Arc<str>, Message>,
}

impl Retained {
    /// Stores `message` (RETAIN set) as the topic's retained message.
    pub(super) fn set(&mut self, message: Message) {
        self.by_topic.insert(message.topic.clone(), message);
    }

    /// Deletes the topic's retained message; true if there was one.
    pub(super) fn delete(&mut self, topic: &str) -> bool {
        self.by_topic.remove(topic).is_some()
    }

    /// The retained messages whose topics match the valid `filter`.
    pub(super) fn matching(&self, filter: &str) -> Vec<Message> {
        if !filter.contains(['+', '#']) {
            return self.by_topic.get(filter).cloned().into_iter().collect();
        }
        self.by_topic
            .values()
            .filter(|m| topic::matches(filter, &m.topic))
            .cloned()
            .collect()
    }

    #[cfg(test)]
    pub(super) fn get(&self, topic: &str) -> Option<&Message> {
        self.by_topic.get(topic)
    }
}
