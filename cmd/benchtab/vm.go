package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

// The VM benchmarks: one go test run, one package at a time, only the
// subtests that measure (TestVMIbv/peer, TestVMSDPOverIbv's ULP comparison,
// TestVMBenchProductPath).
var (
	vmPkgs = []string{"./verbs/ibv", "./sdpback/sdp", "./internal/daemon"}
	vmRun  = `^(TestVMIbv|TestVMSDPOverIbv|TestVMBenchProductPath|TestVMBenchSocketFS)$/^(peer|ULP_comparison)$`
)

// vmRow is one row of a VM-tier table.
type vmRow struct {
	row, ours, base string
	oursV, baseV    float64
	unit            string
}

// vmTable is a VM-tier table in the order its rows came.
type vmTable struct {
	name  string
	rows  []vmRow
	notes []string
}

// parseVM collects the BENCHVM lines of go test output into tables, in
// the order they first appear. Malformed lines are ignored.
func parseVM(r io.Reader) []*vmTable {
	var out []*vmTable
	byName := map[string]*vmTable{}
	table := func(name string) *vmTable {
		tb := byName[name]
		if tb == nil {
			tb = &vmTable{name: name}
			byName[name] = tb
			out = append(out, tb)
		}
		return tb
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case strings.HasPrefix(line, "BENCHVM-NOTE "):
			f := strings.SplitN(strings.TrimPrefix(line, "BENCHVM-NOTE "), "|", 2)
			if len(f) == 2 {
				table(f[0]).notes = append(table(f[0]).notes, f[1])
			}
		case strings.HasPrefix(line, "BENCHVM "):
			f := strings.Split(strings.TrimPrefix(line, "BENCHVM "), "|")
			if len(f) != 7 {
				continue
			}
			ov, err1 := strconv.ParseFloat(f[3], 64)
			bv, err2 := strconv.ParseFloat(f[5], 64)
			if err1 != nil || err2 != nil {
				continue
			}
			tb := table(f[0])
			tb.rows = append(tb.rows, vmRow{row: f[1], ours: f[2], oursV: ov, base: f[4], baseV: bv, unit: f[6]})
		}
	}
	return out
}

// printVM prints a VM-tier table: each row's figure beside the baseline
// measured in the same run, and their ratio.
func printVM(w io.Writer, tb *vmTable) {
	fmt.Fprintf(w, "\n## %s\n\n", tb.name)
	fmt.Fprintln(w, "| case | ours | baseline | ours / baseline |")
	fmt.Fprintln(w, "|---|---|---|---|")
	times := false
	for _, r := range tb.rows {
		ratio := "–"
		if r.baseV > 0 {
			ratio = fmt.Sprintf("**%.2fx**", r.oursV/r.baseV)
		}
		times = times || isTime(r.unit)
		fmt.Fprintf(w, "| %s | %s: %s %s | %s: %s %s | %s |\n", r.row, r.ours, num(r.oursV), r.unit, r.base, num(r.baseV), r.unit, ratio)
	}
	if times {
		tb.notes = append(tb.notes[:len(tb.notes):len(tb.notes)], "for times, a ratio below 1 means ours is faster")
	}
	if len(tb.notes) > 0 {
		fmt.Fprintln(w)
		for _, n := range tb.notes {
			fmt.Fprintf(w, "- %s\n", n)
		}
	}
}

func isTime(unit string) bool {
	switch unit {
	case "ns", "µs", "us", "ms", "s":
		return true
	}
	return false
}

func num(v float64) string {
	if v >= 100 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.2f", v)
}

// runVM runs the VM benchmarks, keeps the log in build/bench-vm.log, and
// prints their tables; it returns the exit code.
func runVM() int {
	args := append([]string{"test", "-p", "1", "-count=1", "-timeout", "20m", "-v", "-run", vmRun}, vmPkgs...)
	cmd := exec.Command("go", args...)
	cmd.Env = append(os.Environ(), "VSDP_VMTEST=1")
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	logPath := filepath.Join("build", "bench-vm.log")
	os.MkdirAll(filepath.Dir(logPath), 0o755)
	log, err := os.Create(logPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer log.Close()
	fmt.Println("\n# VM tier (QEMU TCG guests; figures from this run, ratios against baselines measured beside them)")
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	pr, pw := io.Pipe()
	done := make(chan []*vmTable, 1)
	go func() {
		done <- parseVM(pr)
		io.Copy(io.Discard, pr)
	}()
	sc := bufio.NewScanner(io.TeeReader(out, io.MultiWriter(log, pw)))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "ok ") || strings.HasPrefix(line, "FAIL") || strings.HasPrefix(line, "--- FAIL") || strings.HasPrefix(line, "panic") {
			fmt.Println(line)
		}
	}
	pw.Close()
	tables := <-done
	for _, tb := range tables {
		printVM(os.Stdout, tb)
	}
	if err := cmd.Wait(); err != nil {
		fmt.Fprintf(os.Stderr, "benchtab: VM benchmarks: %v (log: %s)\n", err, logPath)
		return 1
	}
	if len(tables) == 0 {
		fmt.Fprintf(os.Stderr, "benchtab: the VM benchmarks printed no table (log: %s)\n", logPath)
		return 1
	}
	return 0
}
