//go:build conformance

package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
)

// conformanceGVisor runs critest's CRI validation suite on stock
// containerd with gVisor's own shim (containerd-shim-runsc-v1, the runsc
// handler), the baseline, and on containerd-kuasar's kuasar-gvisor, beside
// TestConformance's run on stock runc (runcRes), for reference. Every spec
// that passes on the stock gVisor baseline must pass on kuasar-gvisor.
func conformanceGVisor(t *testing.T, out string, runcRes map[string]specResult) {
	for _, f := range []string{"critest-gvisor-*", "critest-runsc-*"} {
		old, _ := filepath.Glob(filepath.Join(out, f))
		for _, f := range old {
			os.Remove(f)
		}
	}
	var stockRes, kuasarRes map[string]specResult
	t.Run("stock-runsc", func(t *testing.T) {
		d := startDaemon(t, daemonOptions{stock: true, stockGVisor: true, portMap: true})
		// No second run of what fails on the baseline: gVisor lacks those
		// features (a spec passing there by chance would only raise the
		// bar for kuasar-gvisor).
		stockRes = runCritest(t, d, stockGVisor, filepath.Join(out, "critest-runsc.json"), nil)
	})
	t.Run(kuasarGVisor, func(t *testing.T) {
		d := startDaemon(t, daemonOptions{portMap: true})
		kuasarRes = critest(t, d, kuasarGVisor, nil, filepath.Join(out, "critest-gvisor.json"), stockRes)
	})
	if stockRes == nil || kuasarRes == nil || runcRes == nil {
		t.Fatal("a critest run produced no results")
	}
	table, regressions, counts := compareGVisor(runcRes, stockRes, kuasarRes)
	md := fmt.Sprintf("### critest v1.34.0: stock containerd `runc`, stock containerd + containerd-shim-runsc-v1 (`runsc`), containerd-kuasar `kuasar-gvisor` (%s)\n\n%s\n%s",
		time.Now().UTC().Format(time.RFC3339), counts, table)
	if err := os.WriteFile(filepath.Join(out, "conformance-gvisor.md"), []byte(md), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Log("\n" + md)
	for _, r := range regressions {
		t.Errorf("passes on the stock gVisor baseline, not on kuasar-gvisor: %s\n%s", r, kuasarRes[r].Failure)
	}
}

// tally counts a critest run's results.
func tally(res map[string]specResult) (passed, failed, skipped int) {
	for _, r := range res {
		switch r.State {
		case "passed":
			passed++
		case "skipped":
			skipped++
		default:
			failed++
		}
	}
	return
}

// compareGVisor builds the three-way table and lists the specs that pass
// on the stock gVisor baseline but not on kuasar-gvisor.
func compareGVisor(runc, stock, kuasar map[string]specResult) (table string, regressions []string, counts string) {
	names := map[string]bool{}
	for _, res := range []map[string]specResult{runc, stock, kuasar} {
		for n := range res {
			names[n] = true
		}
	}
	sorted := make([]string, 0, len(names))
	for n := range names {
		sorted = append(sorted, n)
	}
	sort.Strings(sorted)
	var b strings.Builder
	b.WriteString("| spec | stock `runc` | stock `runsc` (gVisor shim) | `kuasar-gvisor` |\n|---|---|---|---|\n")
	cell := func(r specResult) string {
		if s := r.result(); s != "" {
			return s
		}
		return "absent"
	}
	for _, n := range sorted {
		mark := ""
		if stock[n].State == "passed" && kuasar[n].State != "passed" {
			regressions = append(regressions, n)
			mark = " **REGRESSION**"
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s%s |\n", strings.ReplaceAll(n, "|", "\\|"), cell(runc[n]), cell(stock[n]), cell(kuasar[n]), mark)
	}
	line := func(name string, res map[string]specResult) string {
		p, f, s := tally(res)
		return fmt.Sprintf("%s: %d passed, %d failed, %d skipped", name, p, f, s)
	}
	var gvisorOnly, kuasarOnly int
	for _, n := range sorted {
		if runc[n].State == "passed" && stock[n].State != "passed" {
			gvisorOnly++
		}
		if stock[n].State != "passed" && kuasar[n].State == "passed" {
			kuasarOnly++
		}
	}
	counts = fmt.Sprintf("%s. %s. %s. Specs passing on stock runc and not on the stock gVisor baseline: %d. "+
		"Passing on the baseline and not on kuasar-gvisor: %d. Passing on kuasar-gvisor and not on the baseline: %d.\n",
		line("Stock runc", runc), line("Stock runsc", stock), line("kuasar-gvisor", kuasar), gvisorOnly, len(regressions), kuasarOnly)
	return b.String(), regressions, counts
}
