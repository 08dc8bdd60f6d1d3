//! The per-session map of prepared statements, which `EXECUTE` is classified through.

use std::collections::HashMap;
use std::sync::Arc;

use crate::risk::ClassSet;
use crate::{Classification, Classifier, ClassifyError, SessionEffect, StatementClass, notes};

/// The prepared statements of one session, by name, with what each one does.
///
/// `EXECUTE x` says nothing by itself: what it runs was fixed by an earlier `PREPARE x AS …`
/// (SQL level) or `Parse` message (extended protocol). Both share one namespace on the server,
/// so they share this map; the proxy keeps one per upstream connection.
///
/// The map errs on the strict side whenever it cannot know what the server did:
/// - a name prepared again (which the server refuses while the old one exists) keeps the
///   union of both classifications, since the proxy may not know which one the server holds;
/// - a name is forgotten only when the proxy says the server dropped it ([`Self::remove`],
///   [`Self::clear`], [`Self::confirm`]), never merely because a `DEALLOCATE` was seen: a
///   `DEALLOCATE` the policy refused would otherwise let a later `PREPARE` of the same name
///   relabel the statement the server still holds;
/// - `EXECUTE` of a name not in the map is [`crate::risk::OPAQUE_CODE`] (the server will
///   most likely refuse it anyway, but the classifier cannot tell what it would run);
/// - at most [`Self::MAX_NAMES`] names are tracked; beyond that new names are not recorded,
///   and executing them is opaque code too.
#[derive(Debug, Clone, Default)]
pub struct PreparedStatements {
    statements: HashMap<String, Arc<Classification>>,
}

/// A name re-prepared this many times keeps only the union of its classifications, so a
/// loop of failing `PREPARE`s cannot grow an entry without bound.
const MAX_MERGED: usize = 8;

impl PreparedStatements {
    /// How many names one session may have tracked; enough for any ORM's statement cache.
    pub const MAX_NAMES: usize = 10_000;

    /// An empty map, for a new session.
    pub fn new() -> PreparedStatements {
        PreparedStatements::default()
    }

    /// Classifies `sql` sent by this session: through `classifier`'s cache, then resolved
    /// against this session's prepared statements (see [`Self::resolve`]).
    pub fn classify(
        &mut self,
        classifier: &Classifier,
        sql: &str,
    ) -> Result<Arc<Classification>, ClassifyError> {
        let classification = classifier.classify(sql)?;
        Ok(self.resolve(classification))
    }

    /// Applies `classification` (from [`Classifier::classify`] or [`crate::classify`]) to
    /// this session, statement by statement in order: each `PREPARE` records its statement
    /// under its name, and each `EXECUTE` takes on the classes and tables of the statement it
    /// runs. Returns the same `Arc` when nothing needed resolving.
    ///
    /// Call it once per query the session sends, before deciding; a `PREPARE` earlier in a
    /// multi-statement query is seen by an `EXECUTE` later in it.
    pub fn resolve(&mut self, classification: Arc<Classification>) -> Arc<Classification> {
        let needs_work = classification.statements.iter().any(|statement| {
            !statement.executes.is_empty()
                || matches!(statement.session, SessionEffect::Prepare { .. })
        });
        if !needs_work {
            return classification;
        }
        let mut resolved = (*classification).clone();
        for statement in &mut resolved.statements {
            if !statement.executes.is_empty() {
                self.resolve_executes(statement);
            }
            if let SessionEffect::Prepare { name, body } = &statement.session {
                self.register(name, Arc::clone(body));
            }
        }
        Arc::new(resolved)
    }

    fn resolve_executes(&self, statement: &mut StatementClass) {
        let mut classes = statement.base;
        let mut notes = statement
            .notes
            .iter()
            .copied()
            .filter(|note| *note != notes::UNKNOWN_PREPARED)
            .collect::<Vec<_>>();
        for name in &statement.executes {
            match self.statements.get(name) {
                Some(prepared) => {
                    for inner in &prepared.statements {
                        classes.add(ClassSet::from_names(&inner.risk_classes));
                        for table in &inner.tables {
                            if !statement.tables.contains(table) {
                                statement.tables.push(table.clone());
                            }
                        }
                        for note in &inner.notes {
                            if !notes.contains(note) {
                                notes.push(note);
                            }
                        }
                    }
                }
                None => {
                    classes.add(ClassSet::OPAQUE_CODE);
                    if !notes.contains(&notes::UNKNOWN_PREPARED) {
                        notes.push(notes::UNKNOWN_PREPARED);
                    }
                }
            }
        }
        statement.risk_classes = classes.names();
        statement.notes = notes;
    }

    /// Records what the prepared statement `name` runs: for the extended protocol's `Parse`
    /// (the proxy classifies the `Parse` text with [`Classifier::classify`] and registers it
    /// under the statement name; `Bind`/`Execute` of that name are then decided with
    /// [`Self::get`]). A name already present keeps the union of both classifications.
    ///
    /// The unnamed statement (`""`) is replaced by every `Parse` to it and destroyed by every
    /// simple `Query`: the proxy should [`Self::remove`] `""` when it forwards either, then
    /// register the new one.
    pub fn register(&mut self, name: &str, classification: Arc<Classification>) {
        let tracked = self.statements.len();
        match self.statements.get_mut(name) {
            Some(existing) => {
                if Arc::ptr_eq(existing, &classification) || **existing == *classification {
                    return;
                }
                *existing = Arc::new(merge(existing, &classification));
            }
            None if tracked < Self::MAX_NAMES => {
                self.statements.insert(name.to_owned(), classification);
            }
            None => {}
        }
    }

    /// What the prepared statement `name` runs, for deciding a `Bind`/`Execute` of it;
    /// `None` when this session has not prepared it (decide as [`crate::risk::OPAQUE_CODE`]).
    pub fn get(&self, name: &str) -> Option<Arc<Classification>> {
        self.statements.get(name).cloned()
    }

    /// Forgets `name`, once the server has dropped it (`CloseComplete` for a statement,
    /// `DEALLOCATE` completed, the unnamed statement replaced).
    pub fn remove(&mut self, name: &str) {
        self.statements.remove(name);
    }

    /// Forgets every name, once the server has dropped them all (`DEALLOCATE ALL`,
    /// `DISCARD ALL`, a new upstream connection).
    pub fn clear(&mut self) {
        self.statements.clear();
    }

    /// Applies what `statement` did to the server's prepared statements, once the server has
    /// reported it completed (its `CommandComplete`): `DEALLOCATE name` forgets `name`,
    /// `DEALLOCATE ALL` and `DISCARD ALL` forget every name. Other statements change nothing
    /// here (a `PREPARE` was already recorded by [`Self::resolve`]).
    pub fn confirm(&mut self, statement: &StatementClass) {
        match &statement.session {
            SessionEffect::Deallocate { name: Some(name) } => self.remove(name),
            SessionEffect::Deallocate { name: None } => self.clear(),
            SessionEffect::None | SessionEffect::Prepare { .. } => {}
        }
    }

    /// How many names are tracked.
    pub fn len(&self) -> usize {
        self.statements.len()
    }

    /// Whether no name is tracked.
    pub fn is_empty(&self) -> bool {
        self.statements.is_empty()
    }
}

/// The strict union of two classifications of one name.
fn merge(existing: &Classification, new: &Classification) -> Classification {
    let mut statements = existing.statements.clone();
    for statement in &new.statements {
        if !statements.contains(statement) {
            statements.push(statement.clone());
        }
    }
    if statements.len() > MAX_MERGED {
        let mut union = statements[0].clone();
        let mut classes = ClassSet::EMPTY;
        for statement in &statements {
            classes.add(ClassSet::from_names(&statement.risk_classes));
            for table in &statement.tables {
                if !union.tables.contains(table) {
                    union.tables.push(table.clone());
                }
            }
            for note in &statement.notes {
                if !union.notes.contains(note) {
                    union.notes.push(note);
                }
            }
        }
        union.risk_classes = classes.names();
        union.base = classes;
        union.executes.clear();
        statements = vec![union];
    }
    Classification { statements }
}
