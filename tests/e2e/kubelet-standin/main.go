// Command kubelet-standin plays the kubelet's DRA part for one fake node, with the
// kubelet's own code from Kubernetes v1.37.2: the plugin manager (plugin watcher,
// reconciler, operation executor) finds and registers plugins in --registry-dir; the
// kubelet's DRA manager (k8s.io/kubernetes/pkg/kubelet/cm/dra) validates them, connects
// with the generated k8s.io/kubelet DRA clients (45 s per call), and prepares and
// unprepares the ResourceClaims of the pods the scheduler binds to --node-name, exactly
// as a kubelet admitting and terminating those pods would.
//
// What it did is written as JSON under --status-dir (see status.go), for tests to read.
// --dra-api=v1beta1 makes it offer the DRA manager only the services a 1.33 kubelet
// knows, so the plugin is driven over DRA v1beta1 like a 1.33 node would drive it.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	utilfeature "k8s.io/apiserver/pkg/util/feature"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
)

type options struct {
	kubeconfig   string
	nodeName     string
	registryDir  string
	driverName   string
	draAPI       string
	statusDir    string
	stateDir     string
	featureGates string
	workers      int
}

func parseFlags(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("kubelet-standin", flag.ContinueOnError)
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig of the cluster (required)")
	fs.StringVar(&o.nodeName, "node-name", "", "the Node this stand-in plays the kubelet of (required)")
	fs.StringVar(&o.registryDir, "registry-dir", "", "plugin registration directory to watch, the kubelet's plugins_registry (required)")
	fs.StringVar(&o.driverName, "driver-name", "", "if set, pods are admitted only once this DRA driver has registered")
	fs.StringVar(&o.draAPI, "dra-api", "v1", "kubelet to emulate: v1 (1.34+, picks v1 when offered) or v1beta1 (1.32/1.33: knows only v1beta1)")
	fs.StringVar(&o.statusDir, "status-dir", "", "where to write the JSON status files (required)")
	fs.StringVar(&o.stateDir, "state-dir", "", "the DRA manager's checkpoint directory (default <status-dir>/kubelet-state)")
	fs.StringVar(&o.featureGates, "feature-gates", "", "kubelet feature gates, key=value,...")
	fs.IntVar(&o.workers, "workers", 4, "pods handled in parallel")
	klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(klogFlags)
	klogFlags.VisitAll(func(f *flag.Flag) { fs.Var(f.Value, f.Name, f.Usage) })
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	for _, required := range []struct{ name, value string }{
		{"--kubeconfig", o.kubeconfig}, {"--node-name", o.nodeName},
		{"--registry-dir", o.registryDir}, {"--status-dir", o.statusDir},
	} {
		if required.value == "" {
			return o, fmt.Errorf("%s is required", required.name)
		}
	}
	if _, ok := knownServices[o.draAPI]; !ok {
		return o, fmt.Errorf("--dra-api: %q is not one of v1, v1beta1", o.draAPI)
	}
	if o.workers < 1 {
		return o, fmt.Errorf("--workers: must be at least 1, got %d", o.workers)
	}
	if o.stateDir == "" {
		o.stateDir = filepath.Join(o.statusDir, "kubelet-state")
	}
	return o, nil
}

func main() {
	opts, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubelet-standin:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, opts); err != nil {
		klog.ErrorS(err, "kubelet-standin failed")
		klog.Flush()
		os.Exit(1)
	}
	klog.Flush()
}

func run(ctx context.Context, opts options) error {
	if opts.featureGates != "" {
		if err := utilfeature.DefaultMutableFeatureGate.Set(opts.featureGates); err != nil {
			return fmt.Errorf("--feature-gates: %w", err)
		}
	}
	for _, dir := range []string{opts.registryDir, opts.statusDir, opts.stateDir} {
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return err
		}
	}
	config, err := clientcmd.BuildConfigFromFlags("", opts.kubeconfig)
	if err != nil {
		return fmt.Errorf("--kubeconfig: %w", err)
	}
	config.UserAgent = "kubelet-standin/" + opts.nodeName
	// The kubelet's own client limits (KubeletConfiguration kubeAPIQPS and kubeAPIBurst
	// defaults), not client-go's 5 and 10, so pod churn is paced as on a real node.
	config.QPS, config.Burst = 50, 100
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		return err
	}
	status, err := newStatusDir(opts.statusDir)
	if err != nil {
		return err
	}
	standin, err := newStandin(ctx, client, opts, status)
	if err != nil {
		return err
	}
	defer standin.stop()
	return standin.run(ctx)
}
