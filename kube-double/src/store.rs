//! The object store: every object by kind, namespace and name, one global resourceVersion
//! counter that every write bumps, and the recent history of changes that watches replay
//! (older changes are forgotten, and a watch from before them gets 410 Gone). Objects are
//! indexed by uid, and lists read one kind's range, so a store of tens of thousands of
//! objects stays quick.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::kinds::Kind;

/// Where an object lives. Cluster-scoped objects have an empty namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key {
    pub(crate) kind: Kind,
    pub(crate) namespace: String,
    pub(crate) name: String,
}

impl Key {
    pub(crate) fn new(kind: Kind, namespace: &str, name: &str) -> Key {
        Key {
            kind,
            namespace: if kind.namespaced() {
                namespace.to_owned()
            } else {
                String::new()
            },
            name: name.to_owned(),
        }
    }

    /// The key of a stored object.
    pub(crate) fn of(kind: Kind, object: &Value) -> Key {
        Key::new(
            kind,
            str_at(object, "/metadata/namespace"),
            str_at(object, "/metadata/name"),
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change, as watches see it.
#[derive(Debug)]
pub(crate) struct Event {
    pub(crate) rv: u64,
    pub(crate) key: Key,
    pub(crate) ty: EventType,
    /// The object after the change (for a deletion: its last state, at the deletion's
    /// resourceVersion).
    pub(crate) object: Arc<Value>,
    /// The object before the change, for modifications and deletions.
    pub(crate) old: Option<Arc<Value>>,
}

pub(crate) struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    uids: HashMap<String, Key>,
    /// The objects naming each uid in their `ownerReferences`.
    owned: HashMap<String, BTreeSet<Key>>,
    history: VecDeque<Arc<Event>>,
    /// Changes up to this resourceVersion are forgotten.
    compacted: u64,
    history_limit: usize,
    pending: Vec<Arc<Event>>,
    pub(crate) jobs_created: u64,
    /// When each Job was created (the first time, for a name created again).
    pub(crate) job_created_at: HashMap<Key, Instant>,
    active_jobs: usize,
    pub(crate) peak_active_jobs: usize,
}

impl State {
    pub(crate) fn rv(&self) -> u64 {
        self.rv
    }

    pub(crate) fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key)
    }

    /// Objects of `kind`, in `namespace` (or all), in name order.
    pub(crate) fn list<'a>(
        &'a self,
        kind: Kind,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        let from = Key {
            kind,
            namespace: namespace.unwrap_or_default().to_owned(),
            name: String::new(),
        };
        self.objects
            .range(from..)
            .take_while(move |(k, _)| {
                k.kind == kind && namespace.is_none_or(|ns| k.namespace == ns)
            })
            .map(|(_, v)| v)
    }

    /// The objects of `kind` (in `namespace`, or all) whose (namespace, name) come after
    /// `after`, as they were at resourceVersion `rv`, in key order: the later pages of a
    /// list all show the state of its first, as the API server serves them from one
    /// snapshot. `None` when changes since `rv` are forgotten.
    pub(crate) fn list_at(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        rv: u64,
        after: (&str, &str),
    ) -> Option<Vec<Value>> {
        if rv < self.compacted {
            return None;
        }
        let in_range = |k: &Key| {
            k.kind == kind
                && namespace.is_none_or(|ns| k.namespace == ns)
                && (k.namespace.as_str(), k.name.as_str()) > after
        };
        let mut at: BTreeMap<Key, Value> = self
            .list(kind, namespace)
            .map(|o| (Key::of(kind, o), o))
            .filter(|(k, _)| in_range(k))
            .map(|(k, o)| (k, o.clone()))
            .collect();
        // Undo, newest first, every change made since.
        for e in self.history.iter().rev().take_while(|e| e.rv > rv) {
            if !in_range(&e.key) {
                continue;
            }
            match (e.ty, &e.old) {
                (EventType::Added, _) => {
                    at.remove(&e.key);
                }
                (_, Some(old)) => {
                    at.insert(e.key.clone(), (**old).clone());
                }
                (_, None) => {}
            }
        }
        Some(at.into_values().collect())
    }

    /// The objects naming `owner_uid` in their `ownerReferences`, in key order.
    pub(crate) fn owned_by<'a>(
        &'a self,
        owner_uid: &str,
    ) -> impl Iterator<Item = (&'a Key, &'a Value)> + 'a {
        self.owned
            .get(owner_uid)
            .into_iter()
            .flatten()
            .filter_map(|k| self.objects.get_key_value(k))
    }

    /// Adds (or removes) an object to the indexes.
    fn index(&mut self, key: &Key, object: &Value, add: bool) {
        let uid = str_at(object, "/metadata/uid");
        if add {
            self.uids.insert(uid.to_owned(), key.clone());
        } else {
            self.uids.remove(uid);
        }
        for owner in object["metadata"]["ownerReferences"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let owner = str_at(owner, "/uid");
            if add {
                self.owned
                    .entry(owner.to_owned())
                    .or_default()
                    .insert(key.clone());
            } else if let Some(set) = self.owned.get_mut(owner) {
                set.remove(key);
                if set.is_empty() {
                    self.owned.remove(owner);
                }
            }
        }
    }

    /// The object whose uid is `uid`.
    pub(crate) fn by_uid(&self, uid: &str) -> Option<(&Key, &Value)> {
        self.objects.get_key_value(self.uids.get(uid)?)
    }

    fn bump(&mut self, object: &mut Value) -> u64 {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.rv
    }

    fn record(&mut self, event: Event) {
        let event = Arc::new(event);
        if event.key.kind == Kind::Job {
            if event.ty == EventType::Added {
                self.jobs_created += 1;
                self.job_created_at
                    .entry(event.key.clone())
                    .or_insert_with(Instant::now);
            }
            let was = event.old.as_deref().is_some_and(|j| !job_finished(j));
            let is = event.ty != EventType::Deleted && !job_finished(&event.object);
            match (was, is) {
                (false, true) => self.active_jobs += 1,
                (true, false) => self.active_jobs -= 1,
                _ => {}
            }
            self.peak_active_jobs = self.peak_active_jobs.max(self.active_jobs);
        }
        self.history.push_back(event.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
        self.pending.push(event);
    }

    /// Stores a new object (its metadata already filled in) and returns it as stored.
    pub(crate) fn insert(&mut self, key: Key, mut object: Value) -> Value {
        let rv = self.bump(&mut object);
        self.index(&key, &object, true);
        self.objects.insert(key.clone(), object.clone());
        self.record(Event {
            rv,
            key,
            ty: EventType::Added,
            object: Arc::new(object.clone()),
            old: None,
        });
        object
    }

    /// Replaces a stored object and returns it as stored.
    pub(crate) fn replace(&mut self, key: Key, mut object: Value) -> Value {
        let rv = self.bump(&mut object);
        let old = self.objects.insert(key.clone(), object.clone());
        if let Some(old) = &old {
            self.index(&key, old, false);
        }
        self.index(&key, &object, true);
        self.record(Event {
            rv,
            key,
            ty: EventType::Modified,
            object: Arc::new(object.clone()),
            old: old.map(Arc::new),
        });
        object
    }

    /// Removes an object; returns its last state at the deletion's resourceVersion.
    pub(crate) fn remove(&mut self, key: &Key) -> Option<Value> {
        let old = self.objects.remove(key)?;
        self.index(key, &old, false);
        let mut last = old.clone();
        let rv = self.bump(&mut last);
        self.record(Event {
            rv,
            key: key.clone(),
            ty: EventType::Deleted,
            object: Arc::new(last.clone()),
            old: Some(Arc::new(old)),
        });
        Some(last)
    }

    /// The remembered changes after `rv`, or `Err(oldest)` when some were forgotten.
    pub(crate) fn events_after(&self, rv: u64) -> Result<Vec<Arc<Event>>, u64> {
        if rv < self.compacted {
            return Err(self.compacted + 1);
        }
        let first = self.history.partition_point(|e| e.rv <= rv);
        Ok(self.history.range(first..).cloned().collect())
    }

    /// Forgets every change so far: a watch from an earlier resourceVersion gets 410.
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }
}

/// The store, shared by the HTTP server, the controllers and the test.
pub(crate) struct Store {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    events: mpsc::UnboundedSender<Arc<Event>>,
}

impl Store {
    /// A store, and the stream of its changes for the controllers.
    pub(crate) fn new(history_limit: usize) -> (Store, mpsc::UnboundedReceiver<Arc<Event>>) {
        let (events, rx) = mpsc::unbounded_channel();
        let store = Store {
            state: Mutex::new(State {
                rv: 0,
                objects: BTreeMap::new(),
                uids: HashMap::new(),
                owned: HashMap::new(),
                history: VecDeque::new(),
                compacted: 0,
                history_limit: history_limit.max(1),
                pending: Vec::new(),
                jobs_created: 0,
                job_created_at: HashMap::new(),
                active_jobs: 0,
                peak_active_jobs: 0,
            }),
            changed: watch::channel(0).0,
            events,
        };
        (store, rx)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the state atomically, then tells watches and controllers what changed.
    pub(crate) fn write<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (out, pending, rv) = {
            let mut st = self.lock();
            let out = f(&mut st);
            (out, std::mem::take(&mut st.pending), st.rv)
        };
        if !pending.is_empty() {
            for e in pending {
                let _ = self.events.send(e);
            }
            self.changed.send_replace(rv);
        }
        out
    }

    pub(crate) fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.lock())
    }

    /// Wakes on every change (the value is the newest resourceVersion).
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// The string at a JSON pointer, or "".
pub(crate) fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    // `Value::pointer` allocates for every token (to unescape it); the double's own
    // pointers have nothing to unescape, and it reads them on every object of a list.
    let found = match pointer.strip_prefix('/') {
        Some(path) if !path.contains('~') => path.split('/').try_fold(v, |v, token| match v {
            Value::Object(m) => m.get(token),
            Value::Array(a) => token.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        }),
        _ => v.pointer(pointer),
    };
    found.and_then(Value::as_str).unwrap_or("")
}

/// Whether a Job has its terminal condition (`Complete` or `Failed`, status "True").
pub(crate) fn job_finished(job: &Value) -> bool {
    condition(job, "Complete").is_some() || condition(job, "Failed").is_some()
}

/// The "True" condition of `ty` in `status.conditions`.
pub(crate) fn condition<'a>(object: &'a Value, ty: &str) -> Option<&'a Value> {
    object
        .pointer("/status/conditions")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| str_at(c, "/type") == ty && str_at(c, "/status") == "True")
}

/// A condition of status "True", as the controllers write one now.
pub(crate) fn condition_json(ty: &str, reason: &str, message: &str) -> Value {
    let t = now();
    json!({
        "type": ty,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastProbeTime": t,
        "lastTransitionTime": t,
    })
}

/// Now, as the API server writes timestamps.
pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
