//! Gantry's types as Postgres columns: a type stored as text is written as its name and
//! read back through its parser, so a value the code does not know is an error that names
//! it, never a default.

use bytes::BytesMut;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

use super::state::TaskState;
use crate::message::{Attempt, ExecutorClass};

type BoxError = Box<dyn std::error::Error + Sync + Send>;

/// Reads a text column through `parse`.
fn from_text<'a, T>(
    ty: &Type,
    raw: &'a [u8],
    parse: impl FnOnce(&'a str) -> Result<T, String>,
) -> Result<T, BoxError> {
    let text = <&str as FromSql>::from_sql(ty, raw)?;
    parse(text).map_err(BoxError::from)
}

impl<'a> FromSql<'a> for TaskState {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        from_text(ty, raw, |s| {
            s.parse().map_err(|e: String| {
                format!("{e}: the database holds a state this binary does not know (is a newer Gantry writing to it?)")
            })
        })
    }

    fn accepts(ty: &Type) -> bool {
        <&str as FromSql>::accepts(ty)
    }
}

impl ToSql for TaskState {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        self.as_str().to_sql(ty, out)
    }

    fn accepts(ty: &Type) -> bool {
        <&str as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for ExecutorClass {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        from_text(ty, raw, |s| {
            ExecutorClass::parse(s).map_err(|e| format!("executor class {s:?}: {e}"))
        })
    }

    fn accepts(ty: &Type) -> bool {
        <&str as FromSql>::accepts(ty)
    }
}

impl ToSql for ExecutorClass {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        self.as_str().to_sql(ty, out)
    }

    fn accepts(ty: &Type) -> bool {
        <&str as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for Attempt {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        let n = i32::from_sql(ty, raw)?;
        u32::try_from(n)
            .ok()
            .and_then(Attempt::new)
            .ok_or_else(|| format!("attempt {n}: attempts count from 1").into())
    }

    fn accepts(ty: &Type) -> bool {
        <i32 as FromSql>::accepts(ty)
    }
}

impl ToSql for Attempt {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        i32::try_from(self.get())?.to_sql(ty, out)
    }

    fn accepts(ty: &Type) -> bool {
        <i32 as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}
