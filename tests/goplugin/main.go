// Command goplugin is a DRA kubelet plugin for NVIDIA-like GPUs built on
// k8s.io/dynamic-resource-allocation/kubeletplugin, doing per claim the work that
// `gpu-dra plugin` does on the prepare path, the way kubernetes-sigs/dra-example-driver's
// kubelet plugin does it: the helper reads each claim from the API server, then per claim
// a CDI spec (atomic, not fsynced) and the whole checkpoint (temp file, fsync, rename,
// fsync of the folder). It exists only to be timed against ours (tests/e2e/
// test_bench_plugin_api.py); see README.md for what it leaves out.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/klog/v2"
)

type flags struct {
	kubeconfig  string
	nodeName    string
	driverName  string
	registryDir string
	pluginDir   string
	cdiRoot     string
	gpus        int
	qps         float64
	burst       int
	answerOnly  bool
}

func parseFlags() flags {
	var f flags
	flag.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig of the API server the claims are read from (required)")
	flag.StringVar(&f.nodeName, "node-name", "", "the node, also the name of the only pool served (required)")
	flag.StringVar(&f.driverName, "driver-name", "gpu.dra.dev", "DRA driver name")
	flag.StringVar(&f.registryDir, "kubelet-registry-dir", kubeletplugin.KubeletRegistryDir, "folder of the registration socket")
	flag.StringVar(&f.pluginDir, "plugin-data-dir", "", "folder of the DRA socket and the checkpoint (required)")
	flag.StringVar(&f.cdiRoot, "cdi-root", "/var/run/cdi", "folder the CDI specs are written to")
	flag.IntVar(&f.gpus, "gpus", 8, "the node's devices are gpu-0 ... gpu-<gpus-1>")
	// client-go's defaults (5, 10), which dra-example-driver keeps, would hold 100 GETs
	// to 5 a second; ours has no client-side limit, so neither has this by default.
	flag.Float64Var(&f.qps, "kube-api-qps", -1, "client-side rate limit of API calls; negative: none")
	flag.IntVar(&f.burst, "kube-api-burst", 0, "burst of the client-side rate limit")
	flag.BoolVar(&f.answerOnly, "answer-only", false, "answer every call with no devices and no work: after the helper's GET of each claim, no CDI spec and no checkpoint (the floor of a call, for the bench)")
	klog.InitFlags(nil)
	flag.Parse()
	for name, value := range map[string]string{"--kubeconfig": f.kubeconfig, "--node-name": f.nodeName, "--plugin-data-dir": f.pluginDir} {
		if value == "" {
			fmt.Fprintf(os.Stderr, "%s is required\n", name)
			os.Exit(2)
		}
	}
	if f.gpus < 1 {
		fmt.Fprintln(os.Stderr, "--gpus must be at least 1")
		os.Exit(2)
	}
	return f
}

func main() {
	f := parseFlags()
	if err := run(f); err != nil {
		klog.ErrorS(err, "goplugin failed")
		os.Exit(1)
	}
}

func run(f flags) error {
	config, err := clientcmd.BuildConfigFromFlags("", f.kubeconfig)
	if err != nil {
		return fmt.Errorf("--kubeconfig: %w", err)
	}
	config.QPS, config.Burst = float32(f.qps), f.burst
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		return fmt.Errorf("API client: %w", err)
	}
	for _, dir := range []string{f.registryDir, f.pluginDir, f.cdiRoot} {
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return err
		}
	}
	state, err := newState(f.driverName, f.nodeName, f.gpus, f.pluginDir, f.cdiRoot)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	helper, err := kubeletplugin.Start(ctx, &plugin{state: state, fatal: stop, answerOnly: f.answerOnly},
		kubeletplugin.KubeClient(client),
		kubeletplugin.NodeName(f.nodeName),
		kubeletplugin.DriverName(f.driverName),
		kubeletplugin.RegistrarDirectoryPath(f.registryDir),
		kubeletplugin.PluginDataDirectoryPath(f.pluginDir),
	)
	if err != nil {
		return fmt.Errorf("start the kubelet plugin: %w", err)
	}
	klog.InfoS("serving", "driver", f.driverName, "node", f.nodeName)
	<-ctx.Done()
	helper.Stop()
	return nil
}
