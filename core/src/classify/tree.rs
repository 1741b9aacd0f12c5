//! A generic, type-tagged view of a pg_query parse tree.
//!
//! pg_query's own `nodes()` iterator only follows the fields its authors cared about (it misses,
//! for example, `RETURNING` lists, column `DEFAULT`s and most DDL), and the protobuf structs have
//! hundreds of shapes. Every one of them derives `serde::Serialize`, though, and serde hands a
//! serializer the Rust struct name of every value, including the typed (non-`Node`) fields such
//! as `InsertStmt.relation: RangeVar` or `CallStmt.funccall: FuncCall`. [`to_tree`] runs such a
//! serializer and keeps those names, so the walker can visit every node of every statement
//! without a hand-written (and silently incomplete) visitor per struct.

use std::fmt;

use serde::ser::{self, Serialize};

/// One value of the parse tree. `Node` wrappers (`{ node: Some(oneof) }`) and `oneof` variants are
/// unwrapped, so a `Struct` is always a concrete protobuf message such as `RangeVar`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tree {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
    Seq(Vec<Tree>),
    /// A protobuf message: its Rust struct name and its fields in declaration order.
    Struct(&'static str, Vec<(&'static str, Tree)>),
}

impl Tree {
    /// The struct name, if this is a struct.
    pub(crate) fn name(&self) -> Option<&'static str> {
        match self {
            Tree::Struct(name, _) => Some(name),
            _ => None,
        }
    }

    /// A field of a struct; `None` when absent or null.
    pub(crate) fn field(&self, key: &str) -> Option<&Tree> {
        match self {
            Tree::Struct(_, fields) => fields
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v)
                .filter(|v| !matches!(v, Tree::Null)),
            _ => None,
        }
    }

    pub(crate) fn str_field(&self, key: &str) -> &str {
        match self.field(key) {
            Some(Tree::Str(s)) => s,
            _ => "",
        }
    }

    pub(crate) fn bool_field(&self, key: &str) -> bool {
        matches!(self.field(key), Some(Tree::Bool(true)))
    }

    pub(crate) fn int_field(&self, key: &str) -> i64 {
        match self.field(key) {
            Some(Tree::Int(i)) => *i,
            _ => 0,
        }
    }

    /// The items of a sequence field (empty when absent).
    pub(crate) fn seq_field(&self, key: &str) -> &[Tree] {
        match self.field(key) {
            Some(Tree::Seq(items)) => items,
            _ => &[],
        }
    }

    /// The `sval`s of a list of `String` nodes (a qualified name such as `["public", "t"]`).
    /// Accepts a `Seq` or a `List` struct.
    pub(crate) fn name_parts(&self) -> Vec<&str> {
        let items: &[Tree] = match self {
            Tree::Seq(items) => items,
            Tree::Struct("List", _) => self.seq_field("items"),
            _ => &[],
        };
        items
            .iter()
            .filter(|t| t.name() == Some("String"))
            .map(|t| t.str_field("sval"))
            .collect()
    }
}

#[derive(Debug)]
pub(crate) struct TreeError(String);

impl fmt::Display for TreeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TreeError {}

impl ser::Error for TreeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        TreeError(msg.to_string())
    }
}

/// Converts any serializable value (a pg_query protobuf node) into a [`Tree`].
pub(crate) fn to_tree<T: Serialize + ?Sized>(value: &T) -> Result<Tree, TreeError> {
    value.serialize(TreeSerializer)
}

struct TreeSerializer;

pub(crate) struct SeqBuilder(Vec<Tree>);

pub(crate) struct StructBuilder {
    name: &'static str,
    fields: Vec<(&'static str, Tree)>,
}

impl ser::Serializer for TreeSerializer {
    type Ok = Tree;
    type Error = TreeError;
    type SerializeSeq = SeqBuilder;
    type SerializeTuple = SeqBuilder;
    type SerializeTupleStruct = SeqBuilder;
    type SerializeTupleVariant = SeqBuilder;
    type SerializeMap = SeqBuilder;
    type SerializeStruct = StructBuilder;
    type SerializeStructVariant = StructBuilder;

    fn serialize_bool(self, v: bool) -> Result<Tree, TreeError> {
        Ok(Tree::Bool(v))
    }
    fn serialize_i8(self, v: i8) -> Result<Tree, TreeError> {
        Ok(Tree::Int(v.into()))
    }
    fn serialize_i16(self, v: i16) -> Result<Tree, TreeError> {
        Ok(Tree::Int(v.into()))
    }
    fn serialize_i32(self, v: i32) -> Result<Tree, TreeError> {
        Ok(Tree::Int(v.into()))
    }
    fn serialize_i64(self, v: i64) -> Result<Tree, TreeError> {
        Ok(Tree::Int(v))
    }
    fn serialize_u8(self, v: u8) -> Result<Tree, TreeError> {
        Ok(Tree::Int(v.into()))
    }
    fn serialize_u16(self, v: u16) -> Result<Tree, TreeError> {
        Ok(Tree::Int(v.into()))
    }
    fn serialize_u32(self, v: u32) -> Result<Tree, TreeError> {
        Ok(Tree::Int(v.into()))
    }
    fn serialize_u64(self, v: u64) -> Result<Tree, TreeError> {
        Ok(Tree::Int(i64::try_from(v).unwrap_or(i64::MAX)))
    }
    fn serialize_f32(self, _v: f32) -> Result<Tree, TreeError> {
        Ok(Tree::Null)
    }
    fn serialize_f64(self, _v: f64) -> Result<Tree, TreeError> {
        Ok(Tree::Null)
    }
    fn serialize_char(self, v: char) -> Result<Tree, TreeError> {
        Ok(Tree::Str(v.to_string()))
    }
    fn serialize_str(self, v: &str) -> Result<Tree, TreeError> {
        Ok(Tree::Str(v.to_owned()))
    }
    fn serialize_bytes(self, _v: &[u8]) -> Result<Tree, TreeError> {
        Ok(Tree::Null)
    }
    fn serialize_none(self) -> Result<Tree, TreeError> {
        Ok(Tree::Null)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Tree, TreeError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<Tree, TreeError> {
        Ok(Tree::Null)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<Tree, TreeError> {
        Ok(Tree::Null)
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Tree, TreeError> {
        Ok(Tree::Str(variant.to_owned()))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<Tree, TreeError> {
        value.serialize(self)
    }
    /// A protobuf `oneof` variant (`Node::RangeVar(RangeVar { .. })`): the payload carries its
    /// own struct name, so the variant wrapper is dropped.
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        value: &T,
    ) -> Result<Tree, TreeError> {
        value.serialize(self)
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<SeqBuilder, TreeError> {
        Ok(SeqBuilder(Vec::with_capacity(len.unwrap_or(0))))
    }
    fn serialize_tuple(self, len: usize) -> Result<SeqBuilder, TreeError> {
        Ok(SeqBuilder(Vec::with_capacity(len)))
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<SeqBuilder, TreeError> {
        Ok(SeqBuilder(Vec::with_capacity(len)))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        len: usize,
    ) -> Result<SeqBuilder, TreeError> {
        Ok(SeqBuilder(Vec::with_capacity(len)))
    }
    /// Maps (none in the pg_query protobuf) keep only their values: the walker looks for nodes,
    /// not for keys.
    fn serialize_map(self, len: Option<usize>) -> Result<SeqBuilder, TreeError> {
        Ok(SeqBuilder(Vec::with_capacity(len.unwrap_or(0))))
    }
    fn serialize_struct(self, name: &'static str, len: usize) -> Result<StructBuilder, TreeError> {
        Ok(StructBuilder {
            name,
            fields: Vec::with_capacity(len),
        })
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<StructBuilder, TreeError> {
        Ok(StructBuilder {
            name: variant,
            fields: Vec::with_capacity(len),
        })
    }
}

impl ser::SerializeSeq for SeqBuilder {
    type Ok = Tree;
    type Error = TreeError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), TreeError> {
        self.0.push(to_tree(value)?);
        Ok(())
    }
    fn end(self) -> Result<Tree, TreeError> {
        Ok(Tree::Seq(self.0))
    }
}

impl ser::SerializeTuple for SeqBuilder {
    type Ok = Tree;
    type Error = TreeError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), TreeError> {
        ser::SerializeSeq::serialize_element(self, value)
    }
    fn end(self) -> Result<Tree, TreeError> {
        ser::SerializeSeq::end(self)
    }
}

impl ser::SerializeTupleStruct for SeqBuilder {
    type Ok = Tree;
    type Error = TreeError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), TreeError> {
        ser::SerializeSeq::serialize_element(self, value)
    }
    fn end(self) -> Result<Tree, TreeError> {
        ser::SerializeSeq::end(self)
    }
}

impl ser::SerializeTupleVariant for SeqBuilder {
    type Ok = Tree;
    type Error = TreeError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), TreeError> {
        ser::SerializeSeq::serialize_element(self, value)
    }
    fn end(self) -> Result<Tree, TreeError> {
        ser::SerializeSeq::end(self)
    }
}

impl ser::SerializeMap for SeqBuilder {
    type Ok = Tree;
    type Error = TreeError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, _key: &T) -> Result<(), TreeError> {
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), TreeError> {
        ser::SerializeSeq::serialize_element(self, value)
    }
    fn end(self) -> Result<Tree, TreeError> {
        ser::SerializeSeq::end(self)
    }
}

impl ser::SerializeStruct for StructBuilder {
    type Ok = Tree;
    type Error = TreeError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), TreeError> {
        self.fields.push((key, to_tree(value)?));
        Ok(())
    }
    fn end(mut self) -> Result<Tree, TreeError> {
        // `Node { node: Option<oneof> }` is pure indirection: keep only the payload.
        if self.name == "Node" && self.fields.len() == 1 && self.fields[0].0 == "node" {
            return Ok(self.fields.pop().map(|(_, v)| v).unwrap_or(Tree::Null));
        }
        Ok(Tree::Struct(self.name, self.fields))
    }
}

impl ser::SerializeStructVariant for StructBuilder {
    type Ok = Tree;
    type Error = TreeError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), TreeError> {
        ser::SerializeStruct::serialize_field(self, key, value)
    }
    fn end(self) -> Result<Tree, TreeError> {
        ser::SerializeStruct::end(self)
    }
}
