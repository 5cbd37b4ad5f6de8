//! The persistent store (`P`/`PO`): the kernel's on-disk format. See `format`.
//! (Implemented in the store work; this placeholder keeps the tree building.)
