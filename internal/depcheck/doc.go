// Package depcheck holds the test that keeps the package graph pointing one
// way (STYLE.md, "Packages show the architecture"). It has no code of its own.
package depcheck
