package depcheck

import (
	"encoding/json"
	"io"
	"os/exec"
	"strings"
	"testing"
)

const mod = "github.com/vsdp/vsdp/"

// rule forbids packages matching from (a path prefix under the module) to
// depend, directly or not, on any package matching one of deny.
type rule struct {
	from string
	deny []string
	why  string
}

var rules = []rule{
	{"vhost", []string{mod + "sdpback", mod + "verbs"}, "the vhost-user core knows nothing of streams or RDMA"},
	{"vhost/guestmem", []string{mod + "vhost/vsock", mod + "vhost/virtiofs", mod + "vhost/virtq"}, "memory is below rings and devices"},
	{"vhost/virtq", []string{mod + "vhost/vsock", mod + "vhost/virtiofs"}, "rings are below devices"},
	{"sdpback", []string{mod + "vhost/virtq", mod + "vhost/vsock", mod + "vhost/virtiofs", mod + "verbs/ibv"}, "stream logic stays provider- and ring-neutral"},
	{"sdpback/wire", []string{mod}, "the wire codec is pure"},
	{"sdpback/sdp", []string{mod + "vhost"}, "the SDP engine is driven only through verbs"},
	{"verbs", []string{mod + "verbs/ibv", "C"}, "only verbs/ibv uses cgo"},
}

// libraries may not log: only commands wire logrus.
var noLog = rule{"", []string{"github.com/sirupsen/logrus", "log"}, "library packages never log"}

type pkg struct {
	ImportPath string
	Deps       []string
	Imports    []string
	Name       string
}

func listPackages(t *testing.T) []pkg {
	t.Helper()
	cmd := exec.Command("go", "list", "-e", "-json", "./...")
	cmd.Dir = "../.."
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	var pkgs []pkg
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for {
		var p pkg
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	if len(pkgs) == 0 {
		t.Fatal("go list found no packages")
	}
	return pkgs
}

func matches(path, prefix string) bool {
	return path == prefix || strings.HasPrefix(path, prefix+"/")
}

func TestDependencyDirection(t *testing.T) {
	pkgs := listPackages(t)
	checked := 0
	for _, p := range pkgs {
		rel := strings.TrimPrefix(p.ImportPath, mod)
		for _, r := range rules {
			if !matches(rel, r.from) {
				continue
			}
			if rel == "verbs/ibv" || strings.HasPrefix(rel, "verbs/ibv/") || rel == "verbs/provider" {
				continue // the one cgo package, and the selector that links it in
			}
			checked++
			for _, d := range append(p.Deps, p.Imports...) {
				for _, deny := range r.deny {
					if deny == mod && strings.HasPrefix(d, mod) || deny != mod && matches(d, strings.TrimSuffix(deny, "/")) {
						t.Errorf("%s depends on %s: %s", p.ImportPath, d, r.why)
					}
				}
			}
		}
		// Commands and the daemon's wiring log; test harnesses may.
		lib := p.Name != "main" && !strings.HasPrefix(rel, "cmd/") && rel != "internal/daemon" &&
			!strings.HasPrefix(rel, "vmtest") && !strings.HasPrefix(rel, "images")
		if lib {
			for _, d := range p.Imports {
				for _, deny := range noLog.deny {
					// go-fuse takes a *log.Logger; the virtio-fs device
					// hands it one that writes to io.Discard.
					if d == "log" && rel == "vhost/virtiofs" {
						continue
					}
					if d == deny {
						t.Errorf("%s imports %s: %s", p.ImportPath, d, noLog.why)
					}
				}
			}
		}
	}
	if checked == 0 {
		t.Fatal("no package matched any rule: the rules are stale")
	}
}
