//! Reading and writing checkpoints, model folders, images and arrays.
