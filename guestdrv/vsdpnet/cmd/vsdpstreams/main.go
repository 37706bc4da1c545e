package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/vsdp/vsdp/guestdrv/vsdpnet"
	"github.com/vsdp/vsdp/guestdrv/vsdpnet/cmd/vsdpstreams/streamcheck"
)

const runLimit = 2 * time.Minute

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), runLimit)
	defer cancel()
	var err error
	switch {
	case len(os.Args) == 6 && os.Args[1] == "dial":
		err = dial(ctx, os.Args[2:])
	case len(os.Args) == 7 && os.Args[1] == "serve":
		err = serve(ctx, os.Args[2:])
	default:
		fmt.Fprintln(os.Stderr, "usage: vsdpstreams dial ADDR:PORT SEED N BUDGET | serve PORT SEED N BUDGET RELEASEFILE")
		os.Exit(2)
	}
	if err != nil {
		fmt.Printf("FAIL: %v\n", err)
		os.Exit(1)
	}
}

// planArgs parses SEED N BUDGET and returns the plan.
func planArgs(seedS, nS, budgetS string) (uint64, []streamcheck.Header, error) {
	seed, err := strconv.ParseUint(seedS, 0, 64)
	if err != nil {
		return 0, nil, fmt.Errorf("seed: %w", err)
	}
	n, err := strconv.Atoi(nS)
	if err != nil {
		return 0, nil, fmt.Errorf("count: %w", err)
	}
	budget, err := strconv.ParseUint(budgetS, 0, 64)
	if err != nil {
		return 0, nil, fmt.Errorf("budget: %w", err)
	}
	plan, err := streamcheck.Plan(seed, n, budget)
	return seed, plan, err
}

func printReports(rs []streamcheck.Report) {
	var up, down uint64
	for _, r := range rs {
		fmt.Println(r.String())
		up += r.Up
		down += r.Down
	}
	fmt.Printf("streams=%d bytes_up=%d bytes_down=%d\n", len(rs), up, down)
}

func dial(ctx context.Context, args []string) error {
	_, plan, err := planArgs(args[1], args[2], args[3])
	if err != nil {
		return err
	}
	reports := make([]streamcheck.Report, len(plan))
	errs := make([]error, len(plan))
	var wg sync.WaitGroup
	for i, h := range plan {
		wg.Go(func() {
			c, err := vsdpnet.DialContext(ctx, "tcp", args[0])
			if err != nil {
				errs[i] = fmt.Errorf("stream %d: %w", i, err)
				return
			}
			defer c.Close()
			if reports[i], errs[i] = streamcheck.Run(ctx, c, h); errs[i] != nil {
				return
			}
			stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
			defer stop()
			errs[i] = streamcheck.ExpectEOF(c, h, streamcheck.Down, h.Down)
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	printReports(reports)
	return nil
}

func serve(ctx context.Context, args []string) error {
	seed, plan, err := planArgs(args[1], args[2], args[3])
	if err != nil {
		return err
	}
	release := args[4]
	ln, err := vsdpnet.Listen("tcp", ":"+args[0])
	if err != nil {
		return err
	}
	defer ln.Close()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var (
		mu      sync.Mutex
		seen    = map[uint32]bool{}
		conns   []net.Conn
		reports = make([]streamcheck.Report, len(plan))
		errs    = make([]error, len(plan))
		wg      sync.WaitGroup
	)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	accept := func(h streamcheck.Header) error {
		mu.Lock()
		defer mu.Unlock()
		if h.Seed != seed || h.Index >= uint32(len(plan)) || h != plan[h.Index] || seen[h.Index] {
			return fmt.Errorf("header %+v: not in the plan, or seen before", h)
		}
		seen[h.Index] = true
		return nil
	}
	for i := range plan {
		c, err := ln.Accept()
		if err != nil {
			return fmt.Errorf("accept %d: %w", i, err)
		}
		conns = append(conns, c)
		wg.Go(func() {
			r, err := streamcheck.Serve(ctx, c, accept)
			if err != nil {
				errs[i] = err
				return
			}
			mu.Lock()
			reports[r.Index] = r
			mu.Unlock()
		})
	}
	ln.Close() // served streams stay; no more callers
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	// Everything is served: hold the streams open until released.
	for {
		if _, err := os.Stat(release); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("never released: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	for _, c := range conns {
		if err := c.Close(); err != nil {
			return err
		}
	}
	conns = nil
	printReports(reports)
	return nil
}
