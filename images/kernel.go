package images

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
)

// MetaPackage is the Debian metapackage whose dependency names the current
// kernel package (its ABI number changes with security updates).
const MetaPackage = "linux-image-amd64"

// Kernel is an unpacked Debian kernel package in the cache.
type Kernel struct {
	Package string // e.g. "linux-image-6.1.0-56-amd64"
	Version string // e.g. "6.1.0-56-amd64" (the uname -r of the guest)
	Root    string // the unpacked package (boot/, lib/modules/)
}

// Image returns the path of the compressed kernel image (vmlinuz).
func (k *Kernel) Image() string {
	return filepath.Join(k.Root, "boot", "vmlinuz-"+k.Version)
}

// ELF returns the path of the uncompressed kernel (vmlinux), which QEMU
// boots through its PVH entry point. Under TCG that saves the guest's own
// decompression of the image: a boot to /init takes ~3.5 s instead of ~10 s.
func (k *Kernel) ELF() string {
	return filepath.Join(k.Root, "boot", "vmlinux-"+k.Version)
}

// BootImage returns the file to pass to -kernel: ELF when it was
// extracted, Image otherwise.
func (k *Kernel) BootImage() string {
	if _, err := os.Stat(k.ELF()); err == nil {
		return k.ELF()
	}
	return k.Image()
}

// ModuleDir returns the kernel's module directory (lib/modules/VERSION).
func (k *Kernel) ModuleDir() string {
	return filepath.Join(k.Root, "lib", "modules", k.Version)
}

// Deps parses the kernel's modules.dep and modules.builtin.
func (k *Kernel) Deps() (*DepTable, error) {
	f, err := os.Open(filepath.Join(k.ModuleDir(), "modules.dep"))
	if err != nil {
		return nil, fmt.Errorf("images: kernel %s: %w", k.Version, err)
	}
	defer f.Close()
	t, err := ParseModulesDep(f)
	if err != nil {
		return nil, err
	}
	b, err := os.Open(filepath.Join(k.ModuleDir(), "modules.builtin"))
	if errors.Is(err, fs.ErrNotExist) {
		return t, nil
	} else if err != nil {
		return nil, err
	}
	defer b.Close()
	return t, t.AddBuiltin(b)
}

const (
	currentFile  = "current"   // names the package of the last good fetch
	completeFile = ".complete" // marks an unpacked, depmod'ed package dir
)

var packageRE = regexp.MustCompile(`^linux-image-([0-9][A-Za-z0-9.+~-]*)$`)

// kernelVersion returns the version part of a kernel package name.
func kernelVersion(pkg string) (string, error) {
	m := packageRE.FindStringSubmatch(pkg)
	if m == nil {
		return "", fmt.Errorf("images: %q is not a kernel image package name", pkg)
	}
	return m[1], nil
}

// LoadKernel returns the kernel that the last successful FetchKernel left in
// dir, without running any tool. It wraps ErrNoKernel when there is none.
func LoadKernel(dir string) (*Kernel, error) {
	b, err := os.ReadFile(filepath.Join(dir, currentFile))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoKernel, err)
	}
	return loadPackage(dir, strings.TrimSpace(string(b)))
}

func loadPackage(dir, pkg string) (*Kernel, error) {
	ver, err := kernelVersion(pkg)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoKernel, err)
	}
	k := &Kernel{Package: pkg, Version: ver, Root: filepath.Join(dir, pkg)}
	for _, p := range []string{
		filepath.Join(k.Root, completeFile),
		k.Image(),
		filepath.Join(k.ModuleDir(), "modules.dep"),
	} {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrNoKernel, err)
		}
	}
	return k, nil
}

// ResolveKernelPackage asks apt which kernel package MetaPackage currently
// depends on. It needs the apt lists (apt-get update), not the network.
func ResolveKernelPackage(ctx context.Context) (string, error) {
	out, err := runTool(ctx, "", "apt-cache", "depends", MetaPackage)
	if err != nil {
		return "", err
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && f[0] == "Depends:" && packageRE.MatchString(f[1]) {
			return f[1], nil
		}
	}
	return "", &ToolError{Tool: "apt-cache", Args: []string{"depends", MetaPackage},
		Output: tail(out, 2048), Err: errors.New("no linux-image dependency listed")}
}

// FetchKernel makes sure dir holds the kernel package that MetaPackage
// currently depends on: downloaded once (apt-get download), unpacked
// (dpkg -x) and indexed (depmod -b), then recorded as current. Kernels of
// other versions in dir are removed. When apt cannot name the package (no
// apt lists, say) the current cached kernel is returned if there is one.
func FetchKernel(ctx context.Context, dir string) (*Kernel, error) {
	pkg, err := ResolveKernelPackage(ctx)
	if err != nil {
		if k, lerr := LoadKernel(dir); lerr == nil {
			return k, nil
		}
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	k, err := loadPackage(dir, pkg)
	if err != nil {
		if k, err = unpackKernel(ctx, dir, pkg); err != nil {
			return nil, err
		}
	}
	if _, err := os.Stat(k.ELF()); err != nil {
		if err := ExtractELF(ctx, k.Image(), k.ELF()); err != nil {
			return nil, err
		}
	}
	if err := writeAtomic(filepath.Join(dir, currentFile), []byte(pkg+"\n"), 0o644); err != nil {
		return nil, err
	}
	pruneKernels(dir, pkg)
	return k, nil
}

func unpackKernel(ctx context.Context, dir, pkg string) (*Kernel, error) {
	ver, err := kernelVersion(pkg)
	if err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp(dir, ".fetch-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	if _, err := runTool(ctx, tmp, "apt-get", "download", pkg); err != nil {
		return nil, err
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, pkg+"_*.deb"))
	if len(debs) != 1 {
		return nil, &ToolError{Tool: "apt-get", Args: []string{"download", pkg},
			Err: fmt.Errorf("expected one .deb, found %d", len(debs))}
	}
	root := filepath.Join(tmp, "root")
	if _, err := runTool(ctx, tmp, "dpkg", "-x", debs[0], root); err != nil {
		return nil, err
	}
	if _, err := runTool(ctx, tmp, "depmod", "-b", root, ver); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(root, completeFile), []byte(pkg+"\n"), 0o644); err != nil {
		return nil, err
	}
	dst := filepath.Join(dir, pkg)
	if err := os.RemoveAll(dst); err != nil {
		return nil, err
	}
	if err := os.Rename(root, dst); err != nil {
		return nil, err
	}
	return loadPackage(dir, pkg)
}

// pruneKernels removes unpacked kernels other than keep (about 400 MB each)
// and leftovers of interrupted fetches. Errors are ignored: pruning is
// housekeeping.
func pruneKernels(dir, keep string) {
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		n := e.Name()
		if e.IsDir() && n != keep && (packageRE.MatchString(n) || strings.HasPrefix(n, ".fetch-")) {
			os.RemoveAll(filepath.Join(dir, n))
		}
	}
}

// runTool runs a host tool and returns its stdout; a failure is a
// *ToolError carrying the tail of its output.
func runTool(ctx context.Context, dir, tool string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, tool, args...)
	cmd.Dir = dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return nil, &ToolError{Tool: tool, Args: args, Output: tail(append(stdout.Bytes(), stderr.Bytes()...), 4096), Err: err}
	}
	return stdout.Bytes(), nil
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return strings.TrimSpace(string(b))
}

// writeAtomic writes a file through a temporary file and a rename, so a
// reader sees the old or the new content, never a partial one.
func writeAtomic(name string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(name), ".tmp-"+filepath.Base(name)+"-")
	if err != nil {
		return err
	}
	_, werr := f.Write(data)
	cerr := f.Close()
	if err := errors.Join(werr, cerr, os.Chmod(f.Name(), mode)); err != nil {
		os.Remove(f.Name())
		return err
	}
	if err := os.Rename(f.Name(), name); err != nil {
		os.Remove(f.Name())
		return err
	}
	return nil
}
