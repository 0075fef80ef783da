//! Random event sequences against the engine: no panic, and its bookkeeping stays within
//! every cap.
