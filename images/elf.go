package images

import (
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// DefaultLibDirs are the directories the dynamic loader searches on a
// Debian x86-64 system, in its order (multiarch directories first).
var DefaultLibDirs = []string{
	"/lib/x86_64-linux-gnu",
	"/usr/lib/x86_64-linux-gnu",
	"/lib64",
	"/usr/lib64",
	"/lib",
	"/usr/lib",
}

// maxSharedObjects bounds a dependency closure; a real one has a few dozen.
const maxSharedObjects = 512

// SharedDeps returns the shared objects that the ELF files need at run time:
// their DT_NEEDED entries, recursively, and the program interpreter
// (PT_INTERP), each once, as host paths in discovery order. Each entry is the
// path under which the loader would find it (a symbolic link is not
// followed), so copying each file to the same path in the guest reproduces
// what the loader expects. Objects are searched in DT_RPATH (when there is
// no DT_RUNPATH), DT_RUNPATH ($ORIGIN expanded) and then dirs
// (DefaultLibDirs when nil); a candidate of another ELF class or machine is
// skipped as the loader skips it. A name that is not found is a
// *LibraryError wrapping ErrNoLibrary.
func SharedDeps(files []string, dirs []string) ([]string, error) {
	if dirs == nil {
		dirs = DefaultLibDirs
	}
	var (
		out   []string
		seen  = make(map[string]bool) // by DT_NEEDED name or interpreter path
		queue []string
	)
	add := func(p string) {
		if !seen["path:"+p] {
			seen["path:"+p] = true
			out = append(out, p)
			queue = append(queue, p)
		}
	}
	for _, f := range files {
		queue = append(queue, f)
	}
	for len(queue) > 0 {
		obj := queue[0]
		queue = queue[1:]
		info, err := readELF(obj)
		if err != nil {
			return nil, &LibraryError{Object: obj, Err: err}
		}
		if info.interp != "" && !seen["interp:"+info.interp] {
			seen["interp:"+info.interp] = true
			if _, err := os.Stat(info.interp); err != nil {
				return nil, &LibraryError{Object: obj, Lib: info.interp, Err: fmt.Errorf("%w: %v", ErrNoLibrary, err)}
			}
			add(info.interp)
		}
		for _, lib := range info.needed {
			if seen["lib:"+lib] {
				continue
			}
			seen["lib:"+lib] = true
			p, err := findLib(lib, info, obj, dirs)
			if err != nil {
				return nil, &LibraryError{Object: obj, Lib: lib, Err: err}
			}
			add(p)
			if len(out) > maxSharedObjects {
				return nil, &LibraryError{Object: obj, Lib: lib, Err: errors.New("too many shared objects")}
			}
		}
	}
	return out, nil
}

type elfInfo struct {
	class   elf.Class
	machine elf.Machine
	interp  string
	needed  []string
	rpath   []string
	runpath []string
}

func readELF(p string) (*elfInfo, error) {
	f, err := elf.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	info := &elfInfo{class: f.Class, machine: f.Machine}
	for _, prog := range f.Progs {
		if prog.Type != elf.PT_INTERP {
			continue
		}
		b := make([]byte, min(prog.Filesz, 4096))
		if _, err := prog.ReadAt(b, 0); err != nil {
			return nil, fmt.Errorf("reading PT_INTERP: %w", err)
		}
		info.interp = strings.TrimRight(string(b), "\x00")
	}
	if f.Type != elf.ET_DYN && f.Type != elf.ET_EXEC {
		return nil, fmt.Errorf("not an executable or shared object (%v)", f.Type)
	}
	if info.needed, err = f.DynString(elf.DT_NEEDED); err != nil && !noDynamic(f) {
		return nil, err
	}
	rpath, _ := f.DynString(elf.DT_RPATH)
	runpath, _ := f.DynString(elf.DT_RUNPATH)
	origin := filepath.Dir(p)
	info.rpath = splitPath(rpath, origin)
	info.runpath = splitPath(runpath, origin)
	return info, nil
}

// noDynamic reports a static executable, which has no dynamic section.
func noDynamic(f *elf.File) bool { return f.Section(".dynamic") == nil }

func splitPath(entries []string, origin string) []string {
	var out []string
	for _, e := range entries {
		for _, d := range strings.Split(e, ":") {
			if d == "" {
				continue
			}
			d = strings.ReplaceAll(d, "${ORIGIN}", origin)
			d = strings.ReplaceAll(d, "$ORIGIN", origin)
			out = append(out, d)
		}
	}
	return out
}

func findLib(name string, from *elfInfo, obj string, dirs []string) (string, error) {
	if strings.Contains(name, "/") {
		if _, err := os.Stat(name); err != nil {
			return "", fmt.Errorf("%w: %v", ErrNoLibrary, err)
		}
		return name, nil
	}
	var search []string
	if len(from.runpath) == 0 {
		search = append(search, from.rpath...)
	}
	search = append(search, from.runpath...)
	search = append(search, dirs...)
	for _, d := range search {
		p := filepath.Join(d, name)
		f, err := elf.Open(p)
		if err != nil {
			continue
		}
		ok := f.Class == from.class && f.Machine == from.machine
		f.Close()
		if ok {
			return p, nil
		}
	}
	return "", fmt.Errorf("%w in %v", ErrNoLibrary, search)
}

// IsDynamic reports whether the ELF file at p needs the dynamic loader.
func IsDynamic(p string) (bool, error) {
	info, err := readELF(p)
	if err != nil {
		return false, err
	}
	return info.interp != "" || len(info.needed) > 0, nil
}
