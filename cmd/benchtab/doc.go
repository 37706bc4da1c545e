// Command benchtab runs the repository's Go benchmarks and prints them as
// tables of ratios against a baseline measured in the same run.
//
// Convention: a benchmark named Family/<case>/<impl> is one cell; the impl
// whose name starts with "baseline" is the row's reference. Rows are
// cases, columns are impls; each cell shows throughput (MB/s, or ops/s when
// the benchmark sets no bytes) and the ratio to the baseline, so a noisy
// machine still yields a meaningful comparison. Extra metrics reported with
// b.ReportMetric are listed under the table; the per-core throughput
// (MB/cpu-s, from vhosttest.ReportCPU) also gets its ratio to the
// baseline's.
//
// The VM tier (-vm) runs the VM benchmarks instead (two soft-RoCE guests,
// and one guest on vsdpd's vsock device), whose figures come from guest
// programs rather than Go benchmarks. Their host tests print one line per
// row, and benchtab prints each table with the ratio:
//
//	BENCHVM <table>|<row>|<ours>|<value>|<baseline>|<value>|<unit>
//	BENCHVM-NOTE <table>|<note printed under the table>
//
// The whole go test log of a -vm run is kept in build/bench-vm.log.
package main
