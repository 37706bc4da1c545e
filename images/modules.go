package images

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"path"
	"strings"
)

// Limits on modules.dep, a host file but one we parse: a corrupt or
// truncated kernel cache must give an error, not a hang or a huge allocation.
const (
	maxDepLine    = 64 << 10 // bytes in one modules.dep line
	maxDepModules = 1 << 16  // modules in one modules.dep
	maxDepDeps    = 1024     // dependencies of one module
)

// ModuleName normalises a module name or file path the way modprobe does:
// the base name without ".ko" (and any compression suffix), with '-' read as
// '_'. "kernel/lib/crc32-pclmul.ko" and "crc32_pclmul" give the same name.
func ModuleName(s string) string {
	s = path.Base(s)
	for _, ext := range []string{".xz", ".zst", ".gz"} {
		s = strings.TrimSuffix(s, ext)
	}
	s = strings.TrimSuffix(s, ".ko")
	return strings.ReplaceAll(s, "-", "_")
}

// DepTable is a parsed modules.dep: for each module, its file (relative to
// the kernel's module directory) and its direct dependencies.
type DepTable struct {
	file map[string]string   // name → relative path of the .ko
	deps map[string][]string // name → names of the modules it needs
	// builtin names modules compiled into the kernel (modules.builtin):
	// asking for one is not an error and loads nothing.
	builtin map[string]bool
}

// ParseModulesDep reads a modules.dep file ("path.ko: dep.ko dep.ko ...").
// Blank lines are skipped; anything else that is not a well-formed line is
// an error, as is a module listed twice.
func ParseModulesDep(r io.Reader) (*DepTable, error) {
	t := &DepTable{
		file:    make(map[string]string),
		deps:    make(map[string][]string),
		builtin: make(map[string]bool),
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 4096), maxDepLine)
	for n := 1; sc.Scan(); n++ {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		head, tail, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			return nil, &DepError{Line: n, Reason: "no ':'"}
		}
		file := string(bytes.TrimSpace(head))
		if err := checkModulePath(file); err != nil {
			return nil, &DepError{Line: n, Reason: err.Error()}
		}
		name := ModuleName(file)
		if _, dup := t.file[name]; dup {
			return nil, &DepError{Line: n, Reason: "module " + name + " listed twice"}
		}
		if len(t.file) >= maxDepModules {
			return nil, &DepError{Line: n, Reason: "too many modules"}
		}
		fields := bytes.Fields(tail)
		if len(fields) > maxDepDeps {
			return nil, &DepError{Line: n, Reason: "too many dependencies"}
		}
		deps := make([]string, 0, len(fields))
		for _, f := range fields {
			if err := checkModulePath(string(f)); err != nil {
				return nil, &DepError{Line: n, Reason: err.Error()}
			}
			deps = append(deps, ModuleName(string(f)))
		}
		t.file[name] = file
		t.deps[name] = deps
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("images: modules.dep: %w", err)
	}
	return t, nil
}

// checkModulePath accepts a relative, clean path to a .ko file (optionally
// compressed) that stays inside the module directory.
func checkModulePath(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("empty module path")
	case strings.HasPrefix(p, "/"):
		return fmt.Errorf("absolute module path %q", p)
	case path.Clean(p) != p || p == ".." || strings.HasPrefix(p, "../"):
		return fmt.Errorf("unclean module path %q", p)
	case ModuleName(p) == "" || !strings.Contains(path.Base(p), ".ko"):
		return fmt.Errorf("not a module file %q", p)
	}
	return nil
}

// AddBuiltin records the modules named in a modules.builtin file (one path
// per line) as built into the kernel.
func (t *DepTable) AddBuiltin(r io.Reader) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 4096), maxDepLine)
	for sc.Scan() {
		if line := strings.TrimSpace(sc.Text()); line != "" {
			t.builtin[ModuleName(line)] = true
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("images: modules.builtin: %w", err)
	}
	return nil
}

// File returns the path of a module's .ko relative to the module directory.
func (t *DepTable) File(name string) (string, bool) {
	f, ok := t.file[ModuleName(name)]
	return f, ok
}

// implied lists modules that must be loaded before a module although
// modules.dep does not say so. rdma_rxe computes its ICRC through the crypto
// API ("crc32"), which only the crc32_generic module provides on the Debian
// kernel; without it `rdma link add` fails with ENOENT (vm-recipes.md).
var implied = map[string][]string{
	"rdma_rxe": {"crc32_generic"},
}

// Resolve returns the modules to load for the given names, dependencies
// first, each once: the files to insmod, in order, relative to the module
// directory. Built-in modules are left out. An unknown module or a
// dependency cycle is an error.
func (t *DepTable) Resolve(names []string) ([]string, error) {
	const (
		visiting = 1
		done     = 2
	)
	state := make(map[string]int)
	var order []string
	var visit func(name string, depth int, from string) error
	visit = func(name string, depth int, from string) error {
		name = ModuleName(name)
		switch state[name] {
		case done:
			return nil
		case visiting:
			return &ModuleError{Module: name, Reason: "dependency cycle through " + from}
		}
		if depth > maxDepDeps {
			return &ModuleError{Module: name, Reason: "dependency chain too deep"}
		}
		file, ok := t.file[name]
		if !ok {
			if t.builtin[name] {
				state[name] = done
				return nil
			}
			reason := "not in modules.dep"
			if from != "" {
				reason += " (needed by " + from + ")"
			}
			return &ModuleError{Module: name, Reason: reason, Err: ErrNoModule}
		}
		state[name] = visiting
		for _, dep := range implied[name] {
			if err := visit(dep, depth+1, name); err != nil {
				return err
			}
		}
		for _, dep := range t.deps[name] {
			if err := visit(dep, depth+1, name); err != nil {
				return err
			}
		}
		state[name] = done
		order = append(order, file)
		return nil
	}
	for _, n := range names {
		if err := visit(n, 0, ""); err != nil {
			return nil, err
		}
	}
	return order, nil
}
