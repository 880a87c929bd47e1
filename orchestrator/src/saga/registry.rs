//! The saga definitions this binary knows, by name and version. New sagas
//! start under the current (highest) version of their name; a saga in
//! flight is always driven by the version it started with, so a deploy
//! that adds a version lets the older sagas finish as they began.

use std::collections::{BTreeMap, BTreeSet};

use super::{Definition, ORDER_SAGA};

/// Saga definitions by name and version.
#[derive(Debug, Clone)]
pub struct Registry {
    definitions: BTreeMap<&'static str, BTreeMap<u32, &'static Definition>>,
}

impl Default for Registry {
    /// The order saga, v1.
    fn default() -> Self {
        Self::new([&ORDER_SAGA]).expect("the order saga is a valid definition")
    }
}

impl Registry {
    /// A registry of `definitions`; each must be valid
    /// ([`Definition::validate`]) and each (name, version) given once.
    pub fn new(definitions: impl IntoIterator<Item = &'static Definition>) -> Result<Self, String> {
        let mut by_name: BTreeMap<&'static str, BTreeMap<u32, &'static Definition>> =
            BTreeMap::new();
        for definition in definitions {
            definition.validate()?;
            let versions = by_name.entry(definition.name).or_default();
            if versions.insert(definition.version, definition).is_some() {
                return Err(format!(
                    "saga definition {} is given twice",
                    definition.label()
                ));
            }
        }
        Ok(Self {
            definitions: by_name,
        })
    }

    /// The definition a saga of `name` started under `version` runs by;
    /// the error says what this replica knows instead.
    pub fn resolve(&self, name: &str, version: u32) -> Result<&'static Definition, String> {
        let versions = self.definitions.get(name);
        if let Some(definition) = versions.and_then(|v| v.get(&version)) {
            return Ok(definition);
        }
        let known = match versions {
            Some(versions) => versions
                .keys()
                .map(|v| format!("v{v}"))
                .collect::<Vec<_>>()
                .join(", "),
            None => format!("no version of {name:?}"),
        };
        Err(format!(
            "saga definition {name} v{version} is not known to this replica (it knows {known})"
        ))
    }

    /// The version new sagas of `name` start under: the highest known.
    pub fn current(&self, name: &str) -> Option<&'static Definition> {
        self.definitions
            .get(name)
            .and_then(|versions| versions.values().next_back().copied())
    }

    /// Every definition, by name then version.
    pub fn definitions(&self) -> impl Iterator<Item = &'static Definition> + '_ {
        self.definitions
            .values()
            .flat_map(|versions| versions.values().copied())
    }

    /// Every participant a step of some definition names.
    pub fn participants(&self) -> BTreeSet<&'static str> {
        self.definitions()
            .flat_map(|definition| definition.steps.iter().map(|step| step.participant))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::{Status, StepDef};

    static ORDER_V2: Definition = Definition {
        name: "order",
        version: 2,
        steps: &[StepDef {
            name: "only",
            status: Status::Shipping,
            participant: "fourth",
            action: "a",
            compensation: "c",
        }],
        pivot: 0,
    };

    #[test]
    fn resolves_each_version_and_starts_new_sagas_under_the_highest() {
        let registry = Registry::new([&ORDER_V2, &ORDER_SAGA]).unwrap();
        assert_eq!(registry.resolve("order", 1).unwrap().version, 1);
        assert_eq!(registry.resolve("order", 2).unwrap().version, 2);
        assert_eq!(registry.current("order").unwrap().version, 2);
        assert_eq!(
            registry.participants().into_iter().collect::<Vec<_>>(),
            ["fourth", "fulfillment", "inventory", "payment"]
        );
        assert_eq!(
            registry.resolve("order", 3).unwrap_err(),
            "saga definition order v3 is not known to this replica (it knows v1, v2)"
        );
        assert!(
            registry
                .resolve("refund", 1)
                .unwrap_err()
                .contains("no version of \"refund\"")
        );
        assert!(registry.current("refund").is_none());
        assert_eq!(Registry::default().current("order").unwrap().version, 1);
    }

    #[test]
    fn refuses_invalid_and_repeated_definitions() {
        static NO_PIVOT: Definition = Definition {
            name: "x",
            version: 1,
            steps: &[],
            pivot: 0,
        };
        assert!(Registry::new([&NO_PIVOT]).is_err());
        assert!(Registry::new([&ORDER_SAGA, &ORDER_SAGA]).is_err());
    }
}
