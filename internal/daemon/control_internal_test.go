package daemon

import (
	"bufio"
	"encoding/json"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vsdp/vsdp/verbs/soft"
)

// TestFabricTableApply: a worker's table follows the supervisor's
// updates: a full sync drops what went away, set adds, delete removes,
// and a bad entry is reported without stopping the others.
func TestFabricTableApply(t *testing.T) {
	ft := fabricTable{t: soft.NewTable(), known: map[netip.Addr]bool{}}
	has := func(a string) bool { _, ok := ft.t.Lookup(netip.MustParseAddr(a)); return ok }
	steps := []struct {
		name    string
		u       workerUpdate
		bad     bool
		present []string
		absent  []string
	}{
		{"sync", workerUpdate{Table: map[string]string{"10.1.0.1": "unix:/r/h.fabric", "10.1.0.2": "unix:/r/a.fabric"}}, false,
			[]string{"10.1.0.1", "10.1.0.2"}, nil},
		{"set", workerUpdate{Set: map[string]string{"10.1.0.3": "unix:/r/b.fabric"}}, false,
			[]string{"10.1.0.1", "10.1.0.2", "10.1.0.3"}, nil},
		{"delete", workerUpdate{Delete: []string{"10.1.0.2"}}, false,
			[]string{"10.1.0.1", "10.1.0.3"}, []string{"10.1.0.2"}},
		{"sync drops", workerUpdate{Table: map[string]string{"10.1.0.1": "unix:/r/h.fabric", "10.1.0.4": "tcp:127.0.0.1:7470"}}, false,
			[]string{"10.1.0.1", "10.1.0.4"}, []string{"10.1.0.3"}},
		{"bad entries", workerUpdate{Set: map[string]string{"nowhere": "unix:/x", "10.1.0.5": "udp:1", "fd00::1": "unix:/y", "10.1.0.6": "unix:/r/c.fabric"}}, true,
			[]string{"10.1.0.6"}, []string{"10.1.0.5"}},
		{"bad delete", workerUpdate{Delete: []string{"x", "10.1.0.6"}}, true, []string{"10.1.0.1"}, []string{"10.1.0.6"}},
		{"stats only", workerUpdate{Stats: 7}, false, []string{"10.1.0.1", "10.1.0.4"}, nil},
	}
	for _, s := range steps {
		err := ft.apply(s.u)
		if (err != nil) != s.bad {
			t.Fatalf("%s: error %v, want error %v", s.name, err, s.bad)
		}
		for _, a := range s.present {
			if !has(a) {
				t.Fatalf("%s: %s missing", s.name, a)
			}
		}
		for _, a := range s.absent {
			if has(a) {
				t.Fatalf("%s: %s still there", s.name, a)
			}
		}
	}
}

// TestControlRefusesWorkers: the control socket answers a connection
// from a worker's process with a refusal and closes it, and serves any
// other process of the same uid.
func TestControlRefusesWorkers(t *testing.T) {
	self, err := os.FindProcess(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	other, err := os.FindProcess(1)
	if err != nil {
		t.Fatal(err)
	}
	log := logrus.New()
	log.SetOutput(io.Discard)
	w := &worker{vm: VMConfig{Name: "vm1"}, state: StateRunning}
	s := &Supervisor{log: log, workers: []*worker{w}}
	cs, err := listenControl(s, filepath.Join(t.TempDir(), "ctl"))
	if err != nil {
		t.Fatal(err)
	}
	defer cs.close()
	ask := func() ControlReply {
		t.Helper()
		c, err := net.Dial("unix", cs.ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		// A refused connection may be closed before the request is
		// written (EPIPE); the refusal is read all the same.
		c.Write([]byte(`{"op":"list"}` + "\n"))
		line, err := bufio.NewReader(c).ReadBytes('\n')
		if err != nil {
			t.Fatal(err)
		}
		var r ControlReply
		if err := json.Unmarshal(line, &r); err != nil {
			t.Fatalf("%q: %v", line, err)
		}
		return r
	}
	for _, step := range []struct {
		name    string
		proc    *os.Process
		refused bool
	}{
		{"a worker's process (this test, as the worker)", self, true},
		{"not a worker's process", other, false},
		{"no worker process at all", nil, false},
	} {
		w.mu.Lock()
		w.proc = step.proc
		w.mu.Unlock()
		r := ask()
		if refused := !r.OK && strings.Contains(r.Error, "refused"); refused != step.refused {
			t.Errorf("%s: reply %+v, want refused %v", step.name, r, step.refused)
		}
		if !step.refused && (len(r.VMs) != 1 || r.VMs[0].Name != "vm1") {
			t.Errorf("%s: list %+v", step.name, r.VMs)
		}
	}
}
