// Package images builds the guest images of the VM tests from Debian
// packages: a kernel and an initramfs.
//
// # What it owns
//
//   - The guest kernel (FetchKernel, LoadKernel): the package that the
//     linux-image-amd64 metapackage currently depends on, downloaded once
//     with apt-get, unpacked with dpkg -x and indexed with depmod into a
//     cache directory (build/kernel/PACKAGE, with build/kernel/current naming
//     it). Only the last fetched kernel is kept.
//   - Module resolution (ParseModulesDep, DepTable.Resolve): the modules a
//     spec asks for, dependencies first, each once, from modules.dep; modules
//     built into the kernel are skipped; crc32_generic is added before
//     rdma_rxe, which needs it without saying so in modules.dep.
//   - Shared-library resolution (SharedDeps): DT_NEEDED entries, recursively,
//     and the PT_INTERP loader, read with debug/elf and searched like the
//     loader does (RPATH/RUNPATH, then the Debian multiarch directories).
//   - The initramfs (Spec, Builder.Build): busybox-static, a generated /init
//     (InitScript), the modules, Go programs of this repository built with
//     the go tool, host programs with their libraries, and extra files,
//     written as an uncompressed newc archive by github.com/cavaliergopher/cpio.
//
// # Design
//
// A Spec is plain data (it round-trips through JSON for cmd/vsdp-image).
// Build first assembles a manifest (guest path → mode, content or link
// target), hashes it into a key, and writes NAME-KEY.cpio into the cache
// only when no file of that name exists: an unchanged image costs the
// reading and hashing of its inputs (milliseconds) plus a go build cache
// check per Go program (about 0.1 s each). Archives are reproducible: sorted
// entries, zero timestamps, uid/gid 0. Files are written to a temporary name
// and renamed, so concurrent builders never see a partial image. Images of
// the same name unused for an hour are pruned.
//
// /init (busybox ash, PID 1) mounts devtmpfs, proc, sysfs, tmpfs and devpts,
// loads the modules with insmod in order, runs the spec's Init lines, prints
// InitReadyMessage and runs the spec's Service (the vmtest guest agent) in a
// restart loop; ash reaps orphaned processes while it waits. Each failed step
// is appended to InitFailedFile, so a harness can tell "booted" from "booted
// with the device missing".
//
// # Threat model
//
// Everything here runs on the developer's or CI host with the host's
// privileges; inputs are the host's own files (Debian packages, modules.dep,
// ELF files) and specs written by tests. They are trusted not to be
// malicious but not trusted to be well formed: modules.dep parsing is
// bounded (line length, module count, dependency count and depth) and
// fuzzed; ELF reading goes through debug/elf and a bounded closure; guest
// paths in a spec must be absolute, clean and outside the directories /init
// mounts. Errors are returned (sentinels ErrNoKernel, ErrNoModule,
// ErrNoLibrary, ErrSpec, ErrTool; typed *DepError, *ModuleError,
// *LibraryError, *SpecError, *ToolError); the package never logs.
//
// # Concurrency
//
// A Builder holds no mutable state; Build may run concurrently, also from
// several processes, because every file in the caches is published by an
// atomic rename. There are no locks.
package images
