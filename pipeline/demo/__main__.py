from pipeline.demo.cohort import main

main()
